"""PCB-Merging (Du et al., NeurIPS 2024) against numpy: the authors' PCB_merge
(duguodong7/pcb-merging) written out step by step, with client weights in the final mean;
its search space and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.merging.registry import get_method
from fl_merge.methods import merge
from methods.helpers import WEIGHTS, assert_close, assert_refused, make_tvs, norm_p, stack


def ref_pcb(x, p, ratio):
    K, n = x.shape

    def minmax(row):
        span = row.max() - row.min()
        return (row - row.min()) / span if span > 0 else np.zeros_like(row)

    clipped, scores = np.zeros_like(x), np.zeros_like(x)
    total = x.sum(0)
    for i in range(K):
        a = np.abs(x[i])
        srt = np.sort(a)
        lo, hi = srt[int(n * 0.0001)], srt[int(n * (1 - 0.0001) - 1)]
        a = np.clip(a, lo, hi)
        clipped[i] = np.sign(x[i]) * a
        intra = np.exp(K * minmax(a) ** 2)  # the code's exp, overflow-free at this K
        inter = np.tanh(x[i] * total)
        b = intra * inter
        cut = np.sort(b)[int(n * (1 - ratio))]
        scores[i] = minmax(np.maximum(b, cut))
    w = p[:, None] * scores
    den = w.sum(0)
    return np.where(den > 0, (w * clipped).sum(0) / np.where(den > 0, den, 1.0), 0.0)


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.5, 1.0])
def test_pcb_is_the_authors_pcb_merge(w, ratio):
    tvs = make_tvs(6, 30)
    x, p = stack(tvs), norm_p(w, 6)
    assert_close(merge("pcb", tvs, w, ratio=ratio), ref_pcb(x, p, ratio), rtol=1e-6, atol=1e-6)


def test_pcb_keeps_about_the_top_ratio():
    tvs = make_tvs(1, 31)
    x = stack(tvs)
    out = np.concatenate([v.double().numpy().ravel() for v in merge("pcb", tvs, ratio=0.2).values()])
    n = x.shape[1]
    assert 0 < int((out != 0).sum()) <= n - int(n * 0.8)
    # K = 1: Delta is the clipped tau wherever it is kept; with P < 10^4 entries the clip
    # caps only the largest |tau| at the second largest (the code's 99.99% position)
    keep = out != 0
    second = np.sort(np.abs(x[0]))[-2]
    clipped = np.sign(x[0]) * np.minimum(np.abs(x[0]), second)
    np.testing.assert_allclose(out[keep], clipped[keep], rtol=1e-6)
    assert np.abs(x[0]).max() > second and np.abs(out).max() == pytest.approx(second)


def test_pcb_with_many_clients_does_not_overflow():
    g = torch.Generator().manual_seed(33)
    tvs = [{"w": torch.randn(40, generator=g)} for _ in range(100)]
    out = merge("pcb", tvs)["w"]
    assert bool(torch.isfinite(out).all()) and bool((out != 0).any())


def test_declarations():
    m = get_method("pcb")
    assert m.lambda_scale == "delta" and not m.coordinatewise and not m.per_tensor_exact
    assert m.params == {"ratio": 0.1} and m.space == {"ratio": (0.05, 0.1, 0.2)}


@pytest.mark.parametrize("kw,match", [
    ({"ratio": 0.0}, r"ratio must lie in \(0, 1\], got 0.0"),
    ({"ratio": 1.5}, r"ratio must lie in \(0, 1\]"),
    ({"ratio": "a"}, r"ratio must be a finite number"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("pcb", kw, match)


def test_identical_clients_give_the_clipped_vector_less_its_lowest_score():
    """Why the generic identical-clients invariant exempts pcb: with K identical tau, every
    client has the same scores b = exp(K m^2) tanh(K tau^2), so Delta = c (the clipped tau)
    where s > 0; at ratio 1 only each row's lowest-score entry gets s = 0."""
    common = {"w": torch.tensor([0.5, -2.0, 0.05, 1.0, -0.3, 3.0])}
    tvs = [{"w": common["w"].clone()} for _ in range(4)]
    out = merge("pcb", tvs, [1.0, 2.0, 3.0, 4.0], ratio=1.0)["w"]
    # clipped: 3.0 -> 2.0 (second largest |tau|); the lowest score is at |tau| = 0.05
    assert out.tolist() == pytest.approx([0.5, -2.0, 0.0, 1.0, -0.3, 2.0])
