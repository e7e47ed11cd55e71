"""SCE (mergekit 0.1.5's sce) against its definition written out in numpy with loops: top-k
variance selection per tensor, squared-magnitude weights (uniform below 1e-6), sign erasure
(a zero sum elects +), and the weights p_i as our extension (c_i = p_i / max p)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.merging.registry import get_method, is_per_tensor_exact
from fl_merge.merging.scales import eta_for_lambda
from fl_merge.methods import merge
from methods.helpers import SHAPES, WEIGHTS, assert_close, assert_refused, make_tvs, norm_p


def ref_sce_tensor(x, c, topk):
    K, n = x.shape
    x = x.copy()
    if topk < 1:
        var = [sum((x[i, j] - sum(x[:, j]) / K) ** 2 for i in range(K)) / K for j in range(n)]
        m = sum(1 for v in var if v != 0)
        keep = sorted(range(n), key=lambda j: -var[j])[:int(m * topk)]
        for j in range(n):
            if j not in keep:
                x[:, j] = 0.0
    w = [c[i] * sum(v * v for v in x[i]) / n for i in range(K)]
    w = [1.0 / K] * K if abs(sum(w)) < 1e-6 else [v / sum(w) for v in w]
    out = np.zeros(n)
    for j in range(n):
        s = 1.0 if sum(c[i] * x[i, j] for i in range(K)) >= 0 else -1.0
        agree = [i for i in range(K) if np.sign(x[i, j]) == s]
        num = sum(w[i] * x[i, j] for i in agree)
        out[j] = num / max(sum(w[i] for i in agree), 1e-6)
    return out


def ref_sce(tvs, p, topk=1.0):
    c = p / p.max()
    return np.concatenate([
        ref_sce_tensor(np.stack([tv[k].double().numpy().reshape(-1) for tv in tvs]), c, topk)
        for k in SHAPES])


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.3])
@pytest.mark.parametrize("scale", [1.0, 1e-4])  # 1e-4: mean squares below 1e-6, equal weights
def test_sce_is_mergekits_definition(w, topk, scale):
    tvs = make_tvs(5, 41, scale=scale)
    p = norm_p(w[:5] if w else None, 5)
    out = merge("sce", tvs, w[:5] if w else None, select_topk=topk)
    assert_close(out, ref_sce(tvs, p, topk), rtol=1e-5, atol=1e-5 * scale)


def test_by_hand():
    # mean squares: a 5/3, b 10/3 -> weights 1/3, 2/3. coord 0: 1 + 2 > 0, both agree:
    # (1/3 + 4/3) / 1 = 5/3; coord 1: -2 + 1 < 0 elects -: only a: -2; coord 2: b alone.
    a, b = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([2.0, 1.0, -(5.0 ** 0.5)])
    out = merge("sce", [{"w": a}, {"w": b}])["w"]
    assert out.tolist() == pytest.approx([5 / 3, -2.0, -np.sqrt(5.0)], rel=1e-6)
    # select_topk 0.5 of 3 nonzero variances (0.25, 2.25, 1.25) -> int(1.5) = 1 coordinate,
    # the largest variance: coord 1 only
    out = merge("sce", [{"w": a}, {"w": b}], select_topk=0.5)["w"]
    assert out.tolist() == pytest.approx([0.0, -2.0, 0.0], rel=1e-6)


def test_per_tensor_is_the_method_and_declarations():
    tvs = make_tvs(4, 42)
    whole = merge("sce", tvs, select_topk=0.3)
    for key in SHAPES:
        alone = merge("sce", [{key: tv[key]} for tv in tvs], select_topk=0.3)
        assert torch.equal(alone[key], whole[key])
    assert is_per_tensor_exact("sce", {}) and not get_method("sce").coordinatewise
    assert get_method("sce").params == {"select_topk": 1.0}
    assert eta_for_lambda("sce", 1.0, 4) == 1.0


def test_uniform_weights_are_mergekits_unweighted_sce():
    tvs = make_tvs(3, 43)
    a = merge("sce", tvs, None, select_topk=0.5)
    b = merge("sce", tvs, [2.0, 2.0, 2.0], select_topk=0.5)
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)


@pytest.mark.parametrize("kw,match", [
    ({"select_topk": 0.0}, r"select_topk must lie in \(0, 1\], got 0.0"),
    ({"select_topk": 1.2}, r"select_topk must lie in \(0, 1\]"),
    ({"select_topk": "all"}, r"select_topk must be a finite number"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("sce", kw, match)
