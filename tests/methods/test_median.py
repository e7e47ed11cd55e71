"""The coordinate-wise median against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_merge.methods import merge
from methods.helpers import assert_close, make, make_tvs, shapes_st, stack


@pytest.mark.parametrize("k", [1, 2, 5, 6, 8, 9])
def test_median_odd_and_even(k):
    tvs = make_tvs(k, 3)
    x = stack(tvs)
    ref = [float(np.median(x[:, j])) for j in range(x.shape[1])]
    # weights are ignored by design
    assert_close(merge("median", tvs, list(range(1, k + 1))), ref)


def test_median_even_is_mean_of_middle_values():
    tvs = [{"a": torch.tensor([v])} for v in (4.0, 1.0, 10.0, 2.0)]
    assert float(merge("median", tvs)["a"]) == 3.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes_st, k=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_median_matches_numpy_on_random_shapes(shapes, k, seed):
    tvs = make(k, seed, shapes)
    x = np.stack([np.concatenate([tv[n].numpy().ravel() for n in shapes]) for tv in tvs])
    out = merge("median", tvs)
    got = np.concatenate([out[n].numpy().ravel() for n in shapes])
    np.testing.assert_allclose(got, np.median(x, axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [2, 4, 6, 8])
def test_even_k_is_the_mean_of_the_two_middle_values_not_the_lower_one(k):
    rng = np.random.default_rng(100 + k)
    x = rng.normal(size=(k, 7, 5)).astype(np.float32)
    out = merge("median", [{"w": torch.from_numpy(x[i])} for i in range(k)])["w"].numpy()
    srt = np.sort(x, axis=0)
    mean_of_middle = (srt[k // 2 - 1] + srt[k // 2]) / 2  # the rule, written out
    lower_middle = srt[(k - 1) // 2]  # what torch.median would give
    np.testing.assert_allclose(out, mean_of_middle, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, np.median(x, axis=0), rtol=1e-6, atol=1e-6)
    assert np.abs(out - lower_middle).max() > 1e-3  # random data: the two rules differ
