"""TIES-Merging against numpy: the paper's trim / elect / disjoint mean, and the reference
code's tie-breaking (prateeky2806/ties-merging) written out with loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.merging import streaming
from fl_merge.methods import merge
from methods.helpers import (
    SHAPES, WEIGHTS, assert_close, assert_refused, flat, make_tvs, norm_p, ref_ties, stack,
)


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_ties(w, density):
    tvs = make_tvs(6, 10)
    x, p = stack(tvs), norm_p(w, 6)
    assert_close(merge("ties", tvs, w, density=density), ref_ties(x, p, density))


def test_ties_topk_is_global_across_tensors():
    # client 0's big entries all sit in one tensor: a per-tensor top-k would keep entries of
    # the other tensors too, the global one must not.
    tvs = make_tvs(1, 11, scale=1e-3)
    tvs[0]["fc.weight"] += 10.0
    out = merge("ties", tvs, density=35 / flat(tvs[0]).size)
    assert int((out["fc.weight"] != 0).sum()) == 35
    assert all(int((out[k] != 0).sum()) == 0 for k in SHAPES if k != "fc.weight")


def ref_ties_reference(x, p, density):
    """TIES as the reference code does it (prateeky2806/ties-merging, merge_utils.py:
    topk_values_mask, resolve_sign with resolve_zero_signs 'majority', disjoint_merge
    'dis-mean'), written out with loops; weights enter the vote and the mean as p_i. The
    count is the paper's floor(density n): topk_values_mask's `>=` the (n - floor(density n))-th
    smallest keeps one entry more (see the ties docstring)."""
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


@pytest.mark.parametrize("kw,match", [
    ({"density": 0.0}, r"density must lie in \(0, 1\], got 0.0"),
    ({"density": 1.2}, r"density must lie in \(0, 1\]"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("ties", kw, match)


def test_mergekit_convention_by_hand():
    """convention=mergekit (fl_merge/merging/conventions.py): an exact-0 vote elects + where
    ours takes the majority sign (here -), and exactly k entries survive the trim where ours
    keeps every entry tied with the k-th largest. Checked against mergekit itself in
    tests/methods/test_mergekit_parity.py."""
    tvs = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([-1.0, -2.0])}]
    assert merge("ties", tvs, density=1.0)["w"].tolist() == [-1.0, -2.0]
    assert merge("ties", tvs, density=1.0, convention="mergekit")["w"].tolist() == [1.0, -2.0]
    one = [{"w": torch.tensor([3.0, 1.0, 1.0, 1.0])}]
    assert int((merge("ties", one, density=0.5)["w"] != 0).sum()) == 4
    out = merge("ties", one, density=0.5, convention="mergekit")["w"]
    assert int((out != 0).sum()) == 2 and out[0] == 3.0


def test_mergekit_convention_is_per_tensor_exact():
    from fl_merge.io.file_merge import method_scope
    assert method_scope("ties") == "exact"  # through its declared pass (fl_merge/io/file_passes.py)
    assert method_scope("dare", {"base": "ties", "density": 0.5}) == "exact"  # its pass too
    assert method_scope("ties", {"convention": "mergekit"}) == "exact"
    assert method_scope("dare", {"base": "ties", "density": 0.5, "convention": "mergekit"}) == "exact"


@pytest.mark.parametrize("method", ["ties", "dare", "breadcrumbs", "model_stock"])
def test_unknown_convention_is_refused(method):
    assert_refused(method, {"convention": "peft"}, r"convention must be one of fl-merge, mergekit, got 'peft'")
