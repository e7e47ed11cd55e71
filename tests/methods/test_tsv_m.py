"""TSV-M (Gargiulo et al., CVPR 2025) against the authors' algorithm written out in numpy:
each task's top floor(r/K) SVD triplets placed in r slots (leftovers zero), the stacked U
and V orthogonalised by P Q^T of their own SVD, rebuilt; non-matrix tensors averaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.cli.schema import method_configs
from fl_merge.io.file_merge import method_scope
from fl_merge.merging.scales import eta_for_lambda, lambda_scale
from fl_merge.merging.search import knob_grids
from fl_merge.methods import get_method, merge

SHAPES = {"wide": (5, 9), "tall": (11, 4), "square": (6, 6), "bias": (6,),
          "conv": (3, 2, 2, 2), "scalar": ()}


def _tvs(k, seed=0, shapes=SHAPES, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    return [{n: torch.tensor(rng.normal(size=s), dtype=dtype) for n, s in shapes.items()}
            for _ in range(k)]


def ref_tsv_matrix(mats):
    """The authors' compute_and_sum_svd_mem_reduction on one matrix, in numpy."""
    k = len(mats)
    m, n = mats[0].shape
    r = min(m, n)
    kk = int(r * (1 / k))
    sum_u, sum_s, sum_vt = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, x in enumerate(mats):
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        sum_u[:, i * kk:(i + 1) * kk] = u[:, :kk]
        sum_s[i * kk:(i + 1) * kk] = s[:kk]
        sum_vt[i * kk:(i + 1) * kk, :] = vt[:kk, :]
    pu, _, qu = np.linalg.svd(sum_u, full_matrices=False)
    pv, _, qv = np.linalg.svd(sum_vt, full_matrices=False)
    return pu @ qu @ np.diag(sum_s) @ pv @ qv


def ref_tsv(tvs):
    out = {}
    for name in tvs[0]:
        xs = [tv[name].double().numpy() for tv in tvs]
        out[name] = ref_tsv_matrix(xs) if xs[0].ndim == 2 else np.mean(xs, axis=0)
    return out


def _check(delta, ref, rtol=1e-9, atol=1e-9):
    assert list(delta) == list(ref)
    for name, r in ref.items():
        assert tuple(delta[name].shape) == r.shape
        np.testing.assert_allclose(delta[name].double().numpy(), r, rtol=rtol, atol=atol,
                                   err_msg=name)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_uniform_weights_are_the_authors_tsv_m(k):
    tvs = _tvs(k, seed=k)
    _check(merge("tsv_m", tvs), ref_tsv(tvs))


def test_one_client_is_itself_and_bias_conv_scalar_are_the_mean():
    tvs = _tvs(1)
    _check(merge("tsv_m", tvs), {n: v.numpy() for n, v in tvs[0].items()})
    tvs = _tvs(3, seed=7)
    out = merge("tsv_m", tvs)
    for name in ("bias", "conv", "scalar"):
        np.testing.assert_allclose(out[name].numpy(), np.mean([tv[name].numpy() for tv in tvs], 0),
                                   rtol=1e-12, atol=1e-12)


def test_weights_scale_each_clients_singular_values_by_k_p():
    # ours: TSV-M with weights p is the authors' TSV-M on the task vectors K p_i tau_i
    tvs = _tvs(3, seed=3)
    w = np.array([1.0, 3.0, 0.5])
    p = w / w.sum()
    scaled = [{n: v * (3 * p[i]) for n, v in tv.items()} for i, tv in enumerate(tvs)]
    out = merge("tsv_m", tvs, weights=w.tolist())
    _check(out, ref_tsv(scaled))
    # the non-matrix tensors are the weighted mean, and weights do change the matrices
    np.testing.assert_allclose(out["bias"].numpy(), sum(p[i] * tvs[i]["bias"].numpy() for i in range(3)),
                               rtol=1e-12)
    assert not np.allclose(out["wide"].numpy(), ref_tsv(tvs)["wide"])
    # uniform weights in any units are the unweighted method
    _check(merge("tsv_m", tvs, weights=[2.0, 2.0, 2.0]), ref_tsv(tvs))


def test_orthogonal_tasks_give_the_sum_of_their_truncations():
    # disjoint row and column supports: the stacked U and V are already orthonormal, so TSV-M
    # is sum_i (rank-floor(r/K) truncation of tau_i): a sum, not a mean, of the tasks
    rng = np.random.default_rng(1)
    mats = []
    for i in range(2):
        x = np.zeros((8, 10))
        x[4 * i:4 * i + 4, 5 * i:5 * i + 5] = rng.normal(size=(4, 5))
        mats.append(x)
    expected = 0
    for x in mats:
        u, s, vt = np.linalg.svd(x)
        expected = expected + (u[:, :4] * s[:4]) @ vt[:4]  # k = floor(8 / 2) = 4 = rank
    out = merge("tsv_m", [{"w": torch.tensor(x)} for x in mats])["w"]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(expected, mats[0] + mats[1], atol=1e-9)


def test_more_clients_than_rank_leave_the_matrix_at_zero():
    tvs = _tvs(5, shapes={"w": (3, 4), "b": (4,)})  # r = 3, floor(3 / 5) = 0 slots each
    out = merge("tsv_m", tvs)
    assert torch.equal(out["w"], torch.zeros(3, 4, dtype=torch.float64))
    _check(out, ref_tsv(tvs))


def test_identical_clients_give_the_top_k_truncation():
    # the stack is rank-deficient here, where the authors' P Q^T is not unique; ours keeps
    # the unique partial isometry: the result is tau's best rank-floor(r/K) approximation
    x = np.random.default_rng(2).normal(size=(6, 8))
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    for w in ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]):
        out = merge("tsv_m", [{"w": torch.tensor(x)}] * 3, weights=w)["w"]
        np.testing.assert_allclose(out.numpy(), (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-7, atol=1e-7)


def test_lambda_is_the_authors_alpha():
    tvs = _tvs(3, seed=4)
    delta = merge("tsv_m", tvs)
    ref = ref_tsv(tvs)
    theta0 = {n: np.random.default_rng(9).normal(size=r.shape) for n, r in ref.items()}
    for alpha in (0.1, 1.0, 3.0):
        eta = eta_for_lambda("tsv_m", alpha, 3)
        assert eta == alpha
        for n in ref:  # theta0 + eta * Delta = the authors' theta0 + alpha * merged vector
            np.testing.assert_allclose(theta0[n] + eta * delta[n].numpy(), theta0[n] + alpha * ref[n],
                                       rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-2), (torch.bfloat16, 1e-1),
                                       (torch.float32, 1e-4)])
def test_low_precision_keeps_its_dtype_and_matches_float64(dtype, tol):
    tvs = _tvs(2, seed=5, dtype=dtype)
    out = merge("tsv_m", tvs)
    assert all(v.dtype == dtype and v.device.type == "cpu" for v in out.values())
    _check(out, ref_tsv(tvs), rtol=tol, atol=tol)


def test_registration_space_and_refusals():
    m = get_method("tsv_m")
    assert m.params == {} and not m.coordinatewise and m.space == {}
    assert lambda_scale("tsv_m") == "delta" and eta_for_lambda("tsv_m", 0.7, 5) == 0.7
    assert knob_grids("tsv_m", {}) == {}  # lambda (the authors' alpha) is its only search
    assert method_configs()["tsv_m"] == {"name": "tsv_m"}
    assert method_scope("tsv_m") == "exact"
    assert "task_singular_vectors" in m.paper.code
    with pytest.raises(MergeInputError, match="tsv_m"):
        merge("tsv_m", _tvs(2), rank=3)  # it has no knobs: its rank budget is floor(r / K)
