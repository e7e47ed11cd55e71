"""Consensus merging (TALL masks, Wang et al., ICML 2024) against numpy: the paper's masks
written out with loops over tasks and coordinates, its search space and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.merging.registry import get_method
from fl_merge.merging.search import expand, knob_grids
from fl_merge.methods import merge
from methods.helpers import (
    WEIGHTS, assert_close, assert_refused, assert_too_few, make_tvs, norm_p, stack,
)


def ref_consensus(x, p, lam, k):
    """Wang et al. 2024: tau_MTL = sum_t tau_t; m_t = [|tau_t| >= lam |tau_MTL - tau_t|];
    m = [sum_t m_t >= k]; Delta = m * sum_t p_t tau_t (the merge is theta0 + K alpha Delta)."""
    K, n = x.shape
    out = np.zeros(n)
    for j in range(n):
        mtl = sum(x[t, j] for t in range(K))
        votes = sum(1 for t in range(K) if abs(x[t, j]) >= lam * abs(mtl - x[t, j]))
        if votes >= k:
            out[j] = sum(p[t] * x[t, j] for t in range(K))
    return out


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("lam,k", [(0.2, 1), (0.4, 2), (0.6, 2), (0.5, 3), (0.0, 6), (1.0, 0)])
def test_consensus_is_the_papers_masked_task_arithmetic(w, lam, k):
    tvs = make_tvs(6, 20)
    x, p = stack(tvs), norm_p(w, 6)
    expected = ref_consensus(x, p, lam, k)
    assert_close(merge("consensus", tvs, w, mask_lambda=lam, k=k), expected, rtol=1e-6, atol=1e-6)


def test_the_masks_really_drop_and_keep():
    tvs = make_tvs(6, 21)
    x = stack(tvs)
    kept = ref_consensus(x, np.full(6, 1 / 6), 0.4, 2) != 0
    assert 0 < kept.sum() < kept.size  # the test above is not vacuous at the default


def test_by_hand():
    # coordinate 0: both clients agree (each >= 0.5 * the other): kept, mean 1.5;
    # coordinate 1: client 0 dominates (3 >= 0.5*0.1) but 0.1 < 0.5*3: one vote, dropped at k=2;
    # coordinate 2: opposite signs cancel, tau_MTL - tau_i = -tau_j: |1| >= 0.5 |-1|, kept.
    a, b = torch.tensor([1.0, 3.0, 1.0]), torch.tensor([2.0, 0.1, -1.0])
    out = merge("consensus", [{"w": a}, {"w": b}], mask_lambda=0.5, k=2)["w"]
    assert out.tolist() == pytest.approx([1.5, 0.0, 0.0])
    out1 = merge("consensus", [{"w": a}, {"w": b}], mask_lambda=0.5, k=1)["w"]
    assert out1.tolist() == pytest.approx([1.5, 1.55, 0.0])


def test_k_zero_is_task_arithmetic_and_one_client_with_k_one_is_itself():
    tvs = make_tvs(4, 22)
    p = norm_p(WEIGHTS[1][:4], 4)
    assert_close(merge("consensus", tvs, WEIGHTS[1][:4], k=0), p @ stack(tvs))
    one = make_tvs(1, 23)
    assert_close(merge("consensus", one, k=1, mask_lambda=0.6), stack(one)[0])


def test_declarations_and_search_space():
    m = get_method("consensus")
    assert m.lambda_scale == "sum" and m.coordinatewise and m.per_tensor_exact
    assert m.params == {"mask_lambda": 0.4, "k": 2}
    grids = knob_grids("consensus", {})
    assert grids["mask_lambda"] == (0.2, 0.3, 0.4, 0.5, 0.6)
    for K, ks in [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (8, [1, 2, 3])]:
        settings = expand("consensus", {}, grids, make_tvs(K, 24))
        assert sorted({s["k"] for s in settings}) == ks
        assert len(settings) == 5 * len(ks)


@pytest.mark.parametrize("kw,match", [
    ({"mask_lambda": -0.1}, r"mask_lambda must be a number >= 0, got -0.1"),
    ({"mask_lambda": "x"}, r"mask_lambda must be a finite number"),
    ({"k": -1}, r"k \(the number of tasks that must keep a weight\) must be an integer >= 0"),
    ({"k": 1.5}, r"k \(the number of tasks"),
    ({"k": True}, r"k \(the number of tasks"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("consensus", kw, match)


def test_fewer_clients_than_k_is_refused():
    assert_too_few("consensus", 1, {}, r"k=2 asks each kept weight to be claimed by 2 clients")
    assert_too_few("consensus", 2, {"k": 3}, r"only 2: nothing could be kept")


@pytest.mark.parametrize("K", [2, 3, 7])
def test_identical_clients_are_kept_only_below_one_over_k_minus_one(K):
    """K identical tau: tau_MTL - tau_t = (K - 1) tau, so m_t = [1 >= lambda (K - 1)] wherever
    tau != 0 (the paper's definition): the common vector at lambda <= 1/(K - 1), else 0. This
    is why the generic identical-clients invariant runs consensus at mask_lambda = 0."""
    common = make_tvs(1, 25)[0]
    tvs = [{n: v.clone() for n, v in common.items()} for _ in range(K)]
    for lam in (0.0, 0.2, 0.3, 0.4, 0.6, 1.0):
        expected = stack([common])[0] * (lam * (K - 1) <= 1.0)
        assert_close(merge("consensus", tvs, mask_lambda=lam, k=min(K, 2)), expected)
