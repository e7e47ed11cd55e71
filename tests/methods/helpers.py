"""Task vectors and references the per-method tests share: random multi-tensor task vectors,
flattening to numpy, weights as numpy, a numpy TIES, and the one-line-error assertions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.merging.registry import check_method_params
from fl_merge.methods import merge

SHAPES = {"conv.weight": (4, 3, 3), "fc.weight": (5, 7), "fc.bias": (7,), "scale": ()}


def make_tvs(k, seed=0, shapes=SHAPES, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [
        {name: (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
         for name, shape in shapes.items()}
        for _ in range(k)
    ]


def flat(tv) -> np.ndarray:
    return np.concatenate([tv[k].double().numpy().reshape(-1) for k in SHAPES])


def stack(tvs) -> np.ndarray:
    return np.stack([flat(tv) for tv in tvs])


def unflat(vec: np.ndarray, shapes=SHAPES) -> dict:
    out, s = {}, 0
    for k, shp in shapes.items():
        n = int(np.prod(shp, dtype=int))
        out[k] = vec[s:s + n].reshape(shp)
        s += n
    return out


def assert_close(delta, ref_vec, rtol=1e-5, atol=1e-5):
    assert list(delta) == list(SHAPES)
    ref = unflat(np.asarray(ref_vec, dtype=np.float64))
    for k in SHAPES:
        assert tuple(delta[k].shape) == SHAPES[k]
        np.testing.assert_allclose(delta[k].double().numpy(), ref[k], rtol=rtol, atol=atol, err_msg=k)


def norm_p(w, k):
    if w is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum()


WEIGHTS = [None, [1.0, 3.0, 0.5, 2.0, 1.0, 4.0]]


def ref_ties(x, p, density):
    k, n = x.shape
    cnt = max(1, int(density * n))
    trimmed = np.zeros_like(x)
    for i in range(k):
        thr = sorted(np.abs(x[i]), reverse=True)[cnt - 1]
        trimmed[i] = np.where(np.abs(x[i]) >= thr, x[i], 0.0)
    signs = [np.sign(sum(p[i] * trimmed[i, j] for i in range(k))) for j in range(n)]
    majority = np.sign(sum(signs))  # breaks exact ties, as the TIES reference code does
    out = np.zeros(n)
    for j in range(n):
        s = signs[j] if signs[j] != 0 else (majority if majority != 0 else -1.0)
        agree = [i for i in range(k) if np.sign(trimmed[i, j]) == s]
        if agree:
            out[j] = sum(p[i] * trimmed[i, j] for i in agree) / sum(p[i] for i in agree)
    return out



# Property tests (hypothesis): task vectors of random shapes.
PROPERTY_SHAPES = {"a": (6, 5), "b": (5,), "c": (2, 3, 4)}
shape_st = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
shapes_st = st.lists(shape_st, min_size=1, max_size=4).map(
    lambda ss: {f"p{i}": s for i, s in enumerate(ss)})


def make(k=7, seed=0, shapes=PROPERTY_SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(k)]


# Bad input: small task vectors and Fisher arrays, and the expected one-line errors.
def small_tvs(k=6, shapes=None, seed=0):
    shapes = shapes or {"w": (3, 2), "b": (2,)}
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(k)]


def small_fisher(k=6):
    return [{"w": torch.rand(3, 2), "b": torch.rand(2)} for _ in range(k)]


def assert_refused(method, kw, match, k=6, **merge_kw):
    """merge refuses `kw` with one line naming the method, and so does the config check
    that runs ahead of training."""
    with pytest.raises(MergeInputError, match=f"merge method '{method}': .*{match}"):
        merge(method, small_tvs(k), **merge_kw, **kw)
    with pytest.raises(MergeInputError, match=match):
        check_method_params(method, kw)


def assert_too_few(method, k, kw, match, **merge_kw):
    with pytest.raises(MergeInputError, match=f"merge method '{method}' with {k} clients: .*{match}"):
        merge(method, small_tvs(k), **merge_kw, **kw)
