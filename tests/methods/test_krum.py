"""Krum and Multi-Krum against their scores written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_merge.methods import merge
from methods.helpers import (
    PROPERTY_SHAPES, assert_close, assert_refused, assert_too_few, make, make_tvs, norm_p, stack,
)


def ref_krum_scores(x, f):
    k = len(x)
    d = np.array([[float(np.sum((x[i] - x[j]) ** 2)) for j in range(k)] for i in range(k)])
    return [sum(sorted(d[i, j] for j in range(k) if j != i)[: k - f - 2]) for i in range(k)]


@pytest.mark.parametrize("k,f", [(5, 1), (7, 2), (8, 1), (4, 0)])
def test_krum(k, f):
    tvs = make_tvs(k, 7)
    x = stack(tvs)
    best = int(np.argmin(ref_krum_scores(x, f)))
    assert_close(merge("krum", tvs, f=f), x[best], rtol=0, atol=0)


@pytest.mark.parametrize("w", [None, [1, 2, 3, 4, 5, 6, 7]])
@pytest.mark.parametrize("f,m", [(1, None), (1, 3), (2, 1), (2, 5)])
def test_multikrum(w, f, m):
    k = 7
    tvs = make_tvs(k, 8)
    x, p = stack(tvs), norm_p(w, k)
    scores = ref_krum_scores(x, f)
    m_ = k - f if m is None else m
    sel = sorted(range(k), key=lambda i: scores[i])[:m_]
    ref = sum(p[i] * x[i] for i in sel) / sum(p[i] for i in sel)
    assert_close(merge("multikrum", tvs, w, f=f, m=m), ref)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(4, 9), f=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_krum_selects_a_client_and_multikrum_averages(k, f, seed):
    if k <= 2 * f + 2:
        return
    tvs = make(k, seed)
    out = merge("krum", tvs, f=f)
    assert any(all(torch.equal(out[n], tv[n]) for n in PROPERTY_SHAPES) for tv in tvs)
    x = np.stack([np.concatenate([tv[n].double().numpy().ravel() for n in PROPERTY_SHAPES]) for tv in tvs])
    best = int(np.argmin(ref_krum_scores(x, f)))
    assert all(torch.equal(out[n], tvs[best][n]) for n in PROPERTY_SHAPES)
    mk = merge("multikrum", tvs, f=f, m=1)  # m = 1: the mean of Krum's one choice
    assert all(torch.allclose(mk[n], tvs[best][n]) for n in PROPERTY_SHAPES)


@pytest.mark.parametrize("kw,match", [
    ({"f": -1}, r"f \(number of Byzantine clients\) must be an integer >= 0"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("krum", kw, match)


@pytest.mark.parametrize("kw,match", [
    ({"m": 0}, r"m \(clients to average\) must be an integer >= 1"),
])
def test_invalid_multikrum_parameters_are_refused(kw, match):
    assert_refused("multikrum", kw, match)


@pytest.mark.parametrize("k,kw,match", [
    (4, {"f": 1}, r"needs more than 2f\+2 = 4 clients, got 4"),
    (2, {"f": 0}, r"needs more than 2f\+2 = 2 clients, got 2"),
])
def test_too_few_clients_are_refused(k, kw, match):
    assert_too_few("krum", k, kw, match)


@pytest.mark.parametrize("k,kw,match", [
    (6, {"f": 2}, r"needs more than 2f\+2 = 6 clients, got 6"),
    (7, {"f": 1, "m": 7}, r"m=7 exceeds K - f = 6"),
])
def test_too_few_clients_for_multikrum_are_refused(k, kw, match):
    assert_too_few("multikrum", k, kw, match)
