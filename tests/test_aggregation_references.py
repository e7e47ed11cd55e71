"""The fixes of issue 14 item 3, each against an independent reference: FedNova's
normaliser for the optimizer a client ran (closed form by hand, and unrolled torch
optimizers), Fisher merging's floor, hetero's continuity, TIES tie-breaking as in the TIES
reference code, and DARE masks keyed by client identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.merging import streaming
from fl_merge.merging.per_client import normalisers_tensor
from fl_merge.methods import merge
from fl_merge.methods.fednova import fednova_normaliser

# ------------------------------------------------------------------ FedNova normaliser


@pytest.mark.parametrize("r", [0.0, 0.5, 0.9])
def test_momentum_normaliser_small_t_by_hand(r):
    # sum over the steps of the momentum buffer's geometric weights: 1, 1 + r, 1 + r + r^2
    assert fednova_normaliser(1, r) == pytest.approx(1.0, rel=1e-12)
    assert fednova_normaliser(2, r) == pytest.approx(1 + (1 + r), rel=1e-12)
    assert fednova_normaliser(3, r) == pytest.approx(1 + (1 + r) + (1 + r + r * r), rel=1e-12)
    assert fednova_normaliser(4, 0.5) == pytest.approx(1 + 1.5 + 1.75 + 1.875, rel=1e-12)


def test_plain_sgd_and_adam_normalisers_are_the_step_count():
    assert fednova_normaliser(297) == 297.0
    assert fednova_normaliser(19, 0.0, "sgd") == 19.0
    assert fednova_normaliser(297, 0.9, "adam") == 297.0  # beta1 ignored, documented


def _displacement(opt_cls, steps, lr=0.01, **kw):
    """Run `steps` steps of the optimizer on loss g . x (constant gradient g), float64."""
    g = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = opt_cls([x], lr=lr, **kw)
    for _ in range(steps):
        opt.zero_grad()
        (g * x).sum().backward()
        opt.step()
    return x.detach(), g, lr


@pytest.mark.parametrize("r", [0.0, 0.3, 0.9, 0.99])
@pytest.mark.parametrize("t", [1, 2, 5, 19, 297])
def test_momentum_normaliser_matches_unrolled_torch_sgd(r, t):
    """torch.optim.SGD(momentum=r) for t steps on a constant gradient moves x by exactly
    -lr * a * g: a is FedNova's ||a||_1 for that optimizer."""
    x, g, lr = _displacement(torch.optim.SGD, t, momentum=r)
    measured = (-x / (lr * g)).tolist()
    assert measured == pytest.approx([fednova_normaliser(t, r)] * 3, rel=1e-9)


@pytest.mark.parametrize("t", [1, 7, 50])
def test_adam_normaliser_matches_unrolled_adam(t):
    """Adam's bias-corrected step has size lr under a constant gradient, so the displacement
    is lr * t per coordinate, as for plain SGD with a unit gradient: a = t."""
    x, g, lr = _displacement(torch.optim.Adam, t, eps=1e-12)
    measured = (-x / (lr * torch.sign(g))).tolist()
    assert measured == pytest.approx([fednova_normaliser(t, 0.9, "adam")] * 3, rel=1e-6)


def test_issue_example_ratio():
    """297 vs 19 steps of SGD with momentum 0.9: 25.7x, where steps alone say 15.6x."""
    ratio = fednova_normaliser(297, 0.9) / fednova_normaliser(19, 0.9)
    assert round(ratio, 1) == 25.7
    assert round(fednova_normaliser(297) / fednova_normaliser(19), 1) == 15.6


@pytest.mark.parametrize("args,match", [
    ((0,), "steps must be a positive integer, got 0"),
    ((2.5,), "steps must be a positive integer"),
    ((True,), "steps must be a positive integer"),
    ((5, 1.0), r"momentum must lie in \[0, 1\), got 1.0"),
    ((5, -0.1), r"momentum must lie in \[0, 1\)"),
    ((5, 0.9, "rmsprop"), "optimizer must be one of"),
])
def test_normaliser_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        fednova_normaliser(*args)


def test_fednova_with_true_normalisers_undoes_momentum_bias():
    """Two clients run momentum SGD on the same constant gradient for 297 and 19 steps:
    with the momentum normalisers both normalised updates are the same single step
    -lr * g, so Delta = a_eff * (-lr g); with steps alone they disagree."""
    (x1, g, lr), (x2, _, _) = _displacement(torch.optim.SGD, 297, momentum=0.9), \
        _displacement(torch.optim.SGD, 19, momentum=0.9)
    tvs = [{"w": x1}, {"w": x2}]
    a = [fednova_normaliser(297, 0.9), fednova_normaliser(19, 0.9)]
    out = merge("fednova", tvs, normalisers=a)["w"]
    torch.testing.assert_close(out, -(a[0] + a[1]) / 2 * lr * g, rtol=1e-12, atol=0)
    with pytest.warns(UserWarning, match="plain-SGD normaliser"):
        steps_only = merge("fednova", tvs, local_steps=[297, 19])["w"]
    assert not torch.allclose(steps_only, out, rtol=1e-3)


def test_missing_normalisers_fall_back_to_steps_per_client():
    steps = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    with pytest.warns(UserWarning, match="FedNova normaliser missing"):
        a = normalisers_tensor([55.0, None, 7.5], steps, 3)
    assert a.tolist() == [55.0, 20.0, 7.5]
    assert normalisers_tensor(None, None, 3) is None
    assert normalisers_tensor([1, 2, 3], None, 3).tolist() == [1.0, 2.0, 3.0]


def test_methods_without_normalisers_ignore_them_silently():
    import warnings

    tvs = [{"w": torch.ones(2) * i} for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning for a method that has no use
        out = merge("fedavg", tvs, local_steps=[1, 2, 3], normalisers=[None, 4.0, None])
    assert out["w"].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------ Fisher floor


def test_fisher_single_client_returns_its_update_exactly():
    out = merge("fisher", [{"w": torch.ones(4)}], extras={"fisher": [{"w": torch.full((4,), 1e-9)}]})
    assert torch.equal(out["w"], torch.ones(4))  # was 0.091 with eps in the denominator only


def test_fisher_all_zero_is_the_plain_weighted_mean():
    g = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(5, generator=g)} for _ in range(3)]
    zero = [{"w": torch.zeros(5)} for _ in range(3)]
    out = merge("fisher", tvs, [1.0, 2.0, 5.0], extras={"fisher": zero})["w"]
    ref = (1 * tvs[0]["w"] + 2 * tvs[1]["w"] + 5 * tvs[2]["w"]) / 8
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_fisher_two_clients_by_hand():
    # p = (1/4, 3/4), f0 = 0.5. Coordinate 0: F = (1, 3): weights 0.25 * 1.5 = 0.375 and
    # 0.75 * 3.5 = 2.625, Delta = (0.375 * 1 + 2.625 * 3) / 3 = 2.75. Coordinate 1: F = 0:
    # weights 0.25 * 0.5 and 0.75 * 0.5, the plain weighted mean 0.25 * 2 - 0.75 * 2 = -1.
    tvs = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -2.0])}]
    fis = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 0.0])}]
    out = merge("fisher", tvs, [1.0, 3.0], extras={"fisher": fis}, min_fisher=0.5)["w"]
    assert out.tolist() == pytest.approx([2.75, -1.0], abs=1e-6)


# ------------------------------------------------------------------ hetero continuity


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


# ------------------------------------------------------------------ TIES tie-breaking


def ref_ties_reference(x, p, density):
    """TIES as the reference code does it (prateeky2806/ties-merging, merge_utils.py:
    topk_values_mask, resolve_sign with resolve_zero_signs 'majority', disjoint_merge
    'dis-mean'), written out with loops; weights enter the vote and the mean as p_i."""
    k, n = x.shape
    cnt = max(1, int(density * n))
    trimmed = np.zeros_like(x)
    for i in range(k):
        thr = sorted(np.abs(x[i]), reverse=True)[cnt - 1]
        trimmed[i] = [v if abs(v) >= thr else 0.0 for v in x[i]]
    signs = [np.sign(sum(p[i] * trimmed[i, j] for i in range(k))) for j in range(n)]
    majority = np.sign(sum(signs))
    out = np.zeros(n)
    for j in range(n):
        s = signs[j] if signs[j] != 0 else majority
        keep = [i for i in range(k) if (trimmed[i, j] > 0 if s > 0 else trimmed[i, j] < 0)]
        if keep:
            out[j] = sum(p[i] * trimmed[i, j] for i in keep) / sum(p[i] for i in keep)
    return out


@pytest.mark.parametrize("a,b,expected", [
    # elected sums (2, 3, 4, 0): majority +, the tie keeps the positive entry 2
    ([1.0, 2.0, 3.0, 2.0], [1.0, 1.0, 1.0, -2.0], [1.0, 1.5, 2.0, 2.0]),
    # all negated but the tie: majority -, the tie keeps -2
    ([-1.0, -2.0, -3.0, 2.0], [-1.0, -1.0, -1.0, -2.0], [-1.0, -1.5, -2.0, -2.0]),
    # elected (+, -, 0): no majority; the reference then keeps the negative entry
    ([1.0, -1.0, 2.0], [1.0, -1.0, -2.0], [1.0, -1.0, -2.0]),
])
def test_ties_tie_breaking_by_hand(a, b, expected):
    out = merge("ties", [{"w": torch.tensor(a)}, {"w": torch.tensor(b)}], density=1.0)["w"]
    assert out.tolist() == expected


@pytest.mark.parametrize("w", [None, [1.0, 3.0, 1.0, 3.0]])
@pytest.mark.parametrize("density", [0.3, 1.0])
@pytest.mark.parametrize("flip", [False, True])
def test_ties_matches_the_reference_with_exact_ties(monkeypatch, w, density, flip):
    """Small integer updates: many elected sums are exactly 0. Tiny blocks, so ties and
    the majority span several blocks and tensors."""
    g = np.random.default_rng(3)
    shapes = {"a": (7, 5), "b": (11,), "c": (3, 2, 2)}
    k = 4
    tvs = [{n: torch.tensor(g.integers(-3, 4, size=s).astype(np.float32)) for n, s in shapes.items()}
           for _ in range(k)]
    if flip:  # turn the majority negative
        tvs = [{n: -v for n, v in tv.items()} for tv in tvs]
    x = np.stack([np.concatenate([tv[n].numpy().ravel() for n in shapes]) for tv in tvs]).astype(float)
    p = np.full(k, 1 / k) if w is None else np.asarray(w) / sum(w)
    ref = ref_ties_reference(x, p, density)
    monkeypatch.setattr(streaming, "CPU_BLOCK", k * 6)
    monkeypatch.setattr(streaming, "MIN_ROW", 1)
    for out in (merge("ties", tvs, w, density=density),
                merge("dare", tvs, w, drop_rate=0.0, base="ties", density=density)):
        got = np.concatenate([out[n].numpy().ravel() for n in shapes])
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    ties = [j for j in range(x.shape[1]) if np.sign(p @ (x[:, j])) == 0 and x[:, j].any()]
    assert ties and any(ref[j] != 0 for j in ties)  # the tie-break really decided something


# ------------------------------------------------------------------ DARE identity


@pytest.mark.parametrize("base", ["fedavg", "ties"])
def test_dare_does_not_depend_on_client_order(base):
    g = torch.Generator().manual_seed(4)
    tvs = [{"a": torch.randn(30, 7, generator=g), "b": torch.randn(13, generator=g)} for _ in range(5)]
    w, names = [1.0, 2.0, 0.5, 3.0, 1.5], ["rot90", "invert", "parity", "blur", "noise"]
    perm = [2, 4, 0, 3, 1]
    kw = {"drop_rate": 0.6, "seed": 11, "base": base, "density": 0.5}
    a = merge("dare", tvs, w, names=names, **kw)
    b = merge("dare", [tvs[i] for i in perm], [w[i] for i in perm],
              names=[names[i] for i in perm], **kw)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7)
    # without names a client is keyed by its position (documented): order then matters
    c = merge("dare", [tvs[i] for i in perm], [w[i] for i in perm], **kw)
    d = merge("dare", tvs, w, **kw)
    assert not torch.allclose(c["a"], d["a"])


def test_dare_needs_unique_names():
    from fl_merge.core.task_vectors import MergeInputError

    tvs = [{"a": torch.ones(3)} for _ in range(3)]
    with pytest.raises(MergeInputError, match="names must be unique, got 'x' twice"):
        merge("dare", tvs, names=["x", "y", "x"])
