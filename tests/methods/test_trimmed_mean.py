"""The trimmed mean against numpy (sort, drop floor(beta K) each end, mean)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_merge.methods import merge
from methods.helpers import assert_close, assert_refused, assert_too_few, make, make_tvs, shapes_st, stack


@pytest.mark.parametrize("k,beta", [(5, 0.2), (6, 0.25), (8, 0.3), (9, 0.45), (7, 0.5), (4, 0.1)])
def test_trimmed_mean(k, beta):
    tvs = make_tvs(k, 4)
    x = stack(tvs)
    t = int(beta * k)
    ref = [float(np.mean(sorted(x[:, j])[t:k - t])) for j in range(x.shape[1])]
    assert_close(merge("trimmed_mean", tvs, beta=beta), ref)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes_st, k=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_trimmed_mean_matches_numpy_on_random_shapes(shapes, k, seed):
    tvs = make(k, seed, shapes)
    x = np.stack([np.concatenate([tv[n].numpy().ravel() for n in shapes]) for tv in tvs])
    t = int(0.3 * k)
    out = merge("trimmed_mean", tvs, beta=0.3)
    got = np.concatenate([out[n].numpy().ravel() for n in shapes])
    np.testing.assert_allclose(got, np.sort(x, axis=0)[t:k - t].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    ({"beta": 0.6}, r"beta must lie in \[0, 0.5\], got 0.6"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("trimmed_mean", kw, match)


@pytest.mark.parametrize("k,kw,match", [
    (4, {"beta": 0.5}, "drops 2 lowest and 2 highest of 4 values per coordinate"),
    (2, {"beta": 0.5}, "leaving none"),
])
def test_too_few_clients_are_refused(k, kw, match):
    assert_too_few("trimmed_mean", k, kw, match)
