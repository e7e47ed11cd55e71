"""Iso-C against numpy: Task Arithmetic's sum per 2-D tensor, SVD by numpy, the singular
values replaced by their mean (Marczak et al., ICML 2025; danielm1405/iso-merging)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.merging.registry import get_method, is_per_tensor_exact
from fl_merge.merging.scales import eta_for_lambda
from fl_merge.methods import merge
from methods.helpers import SHAPES, WEIGHTS, make_tvs, norm_p


def ref_iso_c(mats, p):
    """K' sum_i p_i tau_i = U S V^T; mean of the nonzero singular values on their directions."""
    k = int((p > 0).sum())
    m = k * sum(pi * t for pi, t in zip(p, mats))
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    r = np.linalg.matrix_rank(m)
    return s[:r].mean() * u[:, :r] @ vt[:r]


def as_np(tvs, key):
    return [tv[key].double().numpy() for tv in tvs]


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("k", [1, 2, 6])
def test_iso_c_against_numpy(w, k):
    tvs = make_tvs(k, 3)
    w = None if w is None else w[:k]
    p = norm_p(w, k)
    out = merge("iso_c", tvs, w)
    assert list(out) == list(SHAPES)
    np.testing.assert_allclose(out["fc.weight"].double().numpy(),
                               ref_iso_c(as_np(tvs, "fc.weight"), p), rtol=1e-4, atol=1e-5)
    for key in ("conv.weight", "fc.bias", "scale"):  # not 2-D: the (weighted) mean
        ref = sum(pi * t for pi, t in zip(p, as_np(tvs, key)))
        np.testing.assert_allclose(out[key].double().numpy(), ref, rtol=1e-5, atol=1e-6)
        assert out[key].dtype == torch.float32 and out[key].device.type == "cpu"


def test_iso_c_is_the_authors_flat_spectrum_of_the_sum():
    """Uniform weights: M = sum_i tau_i, every singular value -> mean(S), in float64."""
    tvs = make_tvs(4, 8, shapes={"w": (9, 6)}, dtype=torch.float64)
    m = sum(as_np(tvs, "w"))
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    out = merge("iso_c", tvs)["w"]
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), u @ np.diag(np.full(6, s.mean())) @ vt, rtol=1e-10)
    assert np.allclose(np.linalg.svd(out.numpy(), compute_uv=False), s.mean())


def test_iso_c_rank_deficient_sum_uses_its_rank():
    """A rank-2 sum: the mean is over its 2 nonzero singular values, on their directions."""
    g = np.random.default_rng(1)
    a, b = np.outer(g.normal(size=7), g.normal(size=5)), np.outer(g.normal(size=7), g.normal(size=5))
    u, s, vt = np.linalg.svd(a + b)
    expected = s[:2].mean() * u[:, :2] @ vt[:2]
    out = merge("iso_c", [{"w": torch.tensor(a)}, {"w": torch.tensor(b)}])["w"]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-12)
    zero = merge("iso_c", [{"w": torch.zeros(3, 4)}])["w"]
    assert zero.abs().max() == 0


def test_iso_c_zero_weight_client_is_absent():
    tvs = make_tvs(3, 4)
    a = merge("iso_c", tvs, [1.0, 0.0, 1.0])
    b = merge("iso_c", [tvs[0], tvs[2]])
    for key in SHAPES:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_iso_c_low_precision_comes_back_in_its_dtype():
    tvs = make_tvs(3, 5, dtype=torch.bfloat16)
    out = merge("iso_c", tvs)
    assert all(out[k].dtype == torch.bfloat16 for k in SHAPES)
    ref = ref_iso_c([tv["fc.weight"].double().numpy() for tv in tvs], norm_p(None, 3))
    np.testing.assert_allclose(out["fc.weight"].double().numpy(), ref, rtol=2e-2, atol=2e-2)


def test_iso_c_declarations():
    m = get_method("iso_c")
    assert m.space == {} and m.params == {}
    assert eta_for_lambda("iso_c", 0.3, 8) == pytest.approx(0.3)  # alpha multiplies Delta
    assert is_per_tensor_exact("iso_c")
