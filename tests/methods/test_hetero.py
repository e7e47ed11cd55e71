"""hetero against its formula written out in numpy, by hand, and its continuity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.methods import merge
from methods.helpers import WEIGHTS, assert_close, assert_refused, make_tvs, norm_p, stack


def ref_hetero(x, p, steps, gamma, clip, floor=0.01):
    k = len(x)
    s = np.ones(k) if steps is None else np.asarray(steps, dtype=float)  # normalisers a_i
    u = x / s[:, None]
    n = np.linalg.norm(u, axis=1)
    r = np.median(n) if k % 2 else np.sort(n)[k // 2 - 1]  # torch.median: lower middle
    c = np.minimum(1.0, r / n) if clip else np.ones(k)
    z = u * c[:, None]
    cos = np.zeros(k)
    for i in range(k):
        m = sum(p[j] * z[j] for j in range(k) if j != i) / sum(p[j] for j in range(k) if j != i)
        cos[i] = z[i] @ m / (np.linalg.norm(z[i]) * np.linalg.norm(m))
    q = p * (np.minimum(np.maximum(cos, 0), 1) ** gamma + floor)
    q = q / q.sum()
    scale = 1.0 if steps is None else float(p @ s)
    return scale * (q[:, None] * z).sum(0), cos


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("steps", [None, [1, 5, 2, 10, 3, 7]])
@pytest.mark.parametrize("gamma,clip", [(1.0, True), (2.0, False), (0.0, True)])
def test_hetero(w, steps, gamma, clip):
    tvs = make_tvs(6, 16)
    # give them a common direction plus one sign-flipped client so cosines differ
    common = make_tvs(1, 17)[0]
    for i, tv in enumerate(tvs):
        for k in tv:
            tv[k] = tv[k] * 0.5 + (3.0 if i != 4 else -3.0) * common[k] * (i + 1)
    x, p = stack(tvs), norm_p(w, 6)
    ref, cos = ref_hetero(x, p, steps, gamma, clip)
    assert cos[4] < 0 < min(np.delete(cos, 4))
    # normalisers as the clients report them; local steps alone are the plain-SGD fallback
    assert_close(merge("hetero", tvs, w, normalisers=steps, gamma=gamma, clip=clip), ref,
                 rtol=1e-4, atol=1e-4)
    if steps is not None:
        with pytest.warns(UserWarning, match="FedNova normaliser missing"):
            out = merge("hetero", tvs, w, steps, gamma=gamma, clip=clip)
        assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _crossing(t):
    """Three updates whose leave-one-out cosines all change sign at t = 0: orthogonal
    a_i e_i plus t times a common direction."""
    basis = torch.eye(3, dtype=torch.float64)
    common = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    return [{"w": a * basis[i] + t * common} for i, a in enumerate((1.0, 2.0, 3.0))]


@pytest.mark.parametrize("gamma,clip", [(1.0, True), (1.0, False), (2.0, False)])
def test_hetero_is_continuous_when_every_cosine_crosses_zero(gamma, clip):
    w = [1.0, 2.0, 4.0]

    def jump(eps):
        up = merge("hetero", _crossing(eps), w, gamma=gamma, clip=clip)["w"]
        down = merge("hetero", _crossing(-eps), w, gamma=gamma, clip=clip)["w"]
        return float((up - down).norm())

    # the inputs themselves move by 2 eps sqrt(3); the update by O(eps), not by a jump
    for eps in (1e-4, 1e-6, 1e-8):
        assert jump(eps) < 300 * eps, (eps, jump(eps))
    assert jump(1e-4) / jump(1e-6) == pytest.approx(100, rel=0.2)  # linear in eps


@pytest.mark.parametrize("floor,expected", [(0.5, 2 / 3), (0.01, 0.255 / 0.26)])
def test_hetero_weights_by_hand(floor, expected):
    # p = (1/2, 1/4, 1/4), z = (1, 0), (1, 0), (-1, 0) (equal norms: no clipping, no
    # normalisers: a_eff = 1). Leave-one-out consensus: client 0 sees (1/4 - 1/4) = 0, so
    # c_0 = 0; client 1 sees (1/2 - 1/4)/(3/4) > 0, c_1 = 1; client 2 sees +, c_2 = -1.
    # q ~ p (max(c, 0) + floor) = (f/2, (1 + f)/4, f/4); Delta_0 = q_0 + q_1 - q_2.
    tvs = [{"w": torch.tensor(v)} for v in ([1.0, 0.0], [1.0, 0.0], [-1.0, 0.0])]
    out = merge("hetero", tvs, [2.0, 1.0, 1.0], floor=floor)["w"]
    assert out.tolist() == pytest.approx([expected, 0.0], abs=1e-7)
    f = floor
    assert expected == pytest.approx((f / 2 + (1 + f) / 4 - f / 4) / (f / 2 + (1 + f) / 4 + f / 4))


@pytest.mark.parametrize("kw,match", [
    ({"floor": 0.0}, r"floor must lie in \[1e-12, 1e12\], got 0.0"),
    ({"gamma": -1.0}, "gamma must be >= 0"),
    ({"clip": "yes"}, "clip must be true or false"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("hetero", kw, match)
