"""Centered clipping against its iteration written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from fl_merge.methods import merge
from methods.helpers import WEIGHTS, assert_close, assert_refused, flat, make_tvs, norm_p, stack


def ref_cclip(x, p, tau, iters, v0):
    v = v0.copy()
    for _ in range(iters):
        upd = np.zeros_like(v)
        for i in range(len(x)):
            d = np.linalg.norm(x[i] - v)
            upd += p[i] * (x[i] - v) * min(1.0, tau / d if d > 0 else 1.0)
        v = v + upd
    return v


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("tau,iters,center", [(1.0, 1, "zero"), (3.0, 3, "zero"), (0.5, 2, "mean"),
                                              (2.0, 1, "median"), (100.0, 1, "zero")])
def test_cclip(w, tau, iters, center):
    tvs = make_tvs(6, 5)
    x, p = stack(tvs), norm_p(w, 6)
    v0 = {"zero": np.zeros(x.shape[1]), "mean": p @ x, "median": np.median(x, axis=0)}[center]
    ref = ref_cclip(x, p, tau, iters, v0)
    assert_close(merge("cclip", tvs, w, tau=tau, iters=iters, center=center), ref)


def test_cclip_given_center_state_dict():
    tvs = make_tvs(5, 6)
    x, p = stack(tvs), norm_p(None, 5)
    c = make_tvs(1, 99)[0]
    ref = ref_cclip(x, p, 1.5, 2, flat(c))
    assert_close(merge("cclip", tvs, tau=1.5, iters=2, center=c), ref)


@pytest.mark.parametrize("kw,match", [
    ({"tau": -1.0}, r"tau \(clipping radius\) must be > 0, got -1.0"),
    ({"tau": 0.0}, r"tau \(clipping radius\) must be > 0"),
    ({"iters": 0}, "iters must be an integer >= 1"),
    ({"center": "origin"}, "center must be one of"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("cclip", kw, match)
