"""Iso-CTS against numpy: the authors' steps (danielm1405/iso-merging, src/utils/iso.py)
written out with numpy's SVD; the orthogonalisation as A (A^T A)^(-1/2) from an
eigendecomposition (the polar factor, computed another way)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.merging.registry import get_method, is_per_tensor_exact
from fl_merge.merging.scales import eta_for_lambda
from fl_merge.methods import merge
from methods.helpers import assert_refused, make_tvs, norm_p


def sizes(r, f, k):
    common = int(r * f)
    per_task = round((r - common) / k)
    return r - per_task * k, per_task


def polar_cols(a):
    lam, q = np.linalg.eigh(a.T @ a)
    return a @ q @ np.diag(lam ** -0.5) @ q.T


def ref_iso_cts(mats, p, f=0.8):
    k = int((p > 0).sum())
    taus = [k * pi * t for pi, t in zip(p, mats) if pi > 0]
    r = min(taus[0].shape)
    c, d = sizes(r, f, k)
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    proj = u[:, :c] @ u[:, :c].T
    us, ss, vs = [], [], []
    for t in taus:
        ut, st, vtt = np.linalg.svd(t - proj @ t, full_matrices=False)
        us.append(ut[:, :d]), ss.append(st[:d]), vs.append(vtt[:d])
    us.append(u[:, :c]), ss.append(s[:c]), vs.append(vt[:c])
    U, V = polar_cols(np.hstack(us)), polar_cols(np.vstack(vs).T).T
    sigma = np.concatenate(ss)
    assert sigma.size == r
    return sigma.mean() * U @ V


SHAPES = {"a": (20, 16), "b": (10, 14), "bias": (16,), "conv": (3, 2, 2), "s": ()}


@pytest.mark.parametrize("w", [None, [1.0, 3.0, 0.5, 2.0]])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("f", [0.8, 0.5])
def test_iso_cts_against_numpy(w, k, f):
    tvs = make_tvs(k, 7, shapes=SHAPES, dtype=torch.float64)
    w = None if w is None else w[:k]
    p = norm_p(w, k)
    out = merge("iso_cts", tvs, w, common_space_fraction=f)
    assert list(out) == list(SHAPES)
    for key, shape in SHAPES.items():
        mats = [tv[key].numpy() for tv in tvs]
        ref = ref_iso_cts(mats, p, f) if len(shape) == 2 else sum(pi * t for pi, t in zip(p, mats))
        assert out[key].dtype == torch.float64
        np.testing.assert_allclose(out[key].numpy(), ref, rtol=1e-8, atol=1e-10, err_msg=key)


def test_iso_cts_float32_and_task_specific_directions():
    """float32 in, float32 out; with 4 tasks on a 20 x 16 matrix 4 directions come from the
    tasks (c = 12, d = 1), and the result differs from Iso-C's."""
    tvs = make_tvs(4, 2, shapes={"a": (20, 16)})
    assert sizes(16, 0.8, 4) == (12, 1)
    out = merge("iso_cts", tvs)["a"]
    assert out.dtype == torch.float32
    ref = ref_iso_cts([tv["a"].double().numpy() for tv in tvs], norm_p(None, 4))
    # float32 SVDs and products: a few 1e-5 off on entries up to ~3, by how the CPU kernels
    # round (AVX2-pinned MKL: 2.6e-5 on one entry); still far below Iso-C's 1e-2 difference
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-4, atol=1e-4)
    iso_c = merge("iso_c", tvs)["a"].double().numpy()
    assert np.abs(ref - iso_c).max() > 1e-2
    s = np.linalg.svd(out.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(s, s.mean(), rtol=1e-4)  # isotropic


def test_iso_cts_with_fraction_one_is_iso_c():
    tvs = make_tvs(3, 9, shapes={"a": (8, 6), "b": (4,)})
    a, b = merge("iso_cts", tvs, common_space_fraction=1.0), merge("iso_c", tvs)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_iso_cts_zero_weight_client_is_absent():
    tvs = make_tvs(4, 4, shapes=SHAPES, dtype=torch.float64)
    a = merge("iso_cts", tvs, [1.0, 0.0, 2.0, 1.0])
    b = merge("iso_cts", [tvs[0], tvs[2], tvs[3]], [1.0, 2.0, 1.0])
    for key in SHAPES:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-12)


def test_iso_cts_small_fraction_keeps_a_valid_split():
    """f = 0: their split would ask for 6 task directions of a rank-5 matrix (c = -1); the
    per-task share is capped at r // K, so c = 5 - 3 * 1 = 2."""
    tvs = make_tvs(3, 1, shapes={"a": (5, 7)}, dtype=torch.float64)
    out = merge("iso_cts", tvs, common_space_fraction=0.0)["a"].numpy()
    s = np.linalg.svd(out, compute_uv=False)
    np.testing.assert_allclose(s, s.mean(), rtol=1e-8)


@pytest.mark.parametrize("kw,match", [
    ({"common_space_fraction": -0.1}, r"common_space_fraction must lie in \[0, 1\], got -0.1"),
    ({"common_space_fraction": 1.5}, r"common_space_fraction must lie in \[0, 1\]"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("iso_cts", kw, match)


def test_iso_cts_declarations():
    m = get_method("iso_cts")
    assert m.space == {} and m.params == {"common_space_fraction": 0.8}
    assert eta_for_lambda("iso_cts", 0.3, 8) == pytest.approx(0.3)
    assert is_per_tensor_exact("iso_cts")
