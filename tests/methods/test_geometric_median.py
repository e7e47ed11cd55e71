"""The geometric median against Weiszfeld's iteration written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from fl_merge.methods import merge
from methods.helpers import WEIGHTS, assert_close, assert_refused, flat, make_tvs, norm_p, stack


def ref_weiszfeld(x, p, nu, iters):
    v = p @ x
    for _ in range(iters):
        b = np.array([p[i] / max(nu, np.linalg.norm(v - x[i])) for i in range(len(x))])
        v = (b[:, None] * x).sum(0) / b.sum()
    return v


@pytest.mark.parametrize("w", WEIGHTS)
def test_geometric_median(w):
    tvs = make_tvs(6, 9)
    x, p = stack(tvs), norm_p(w, 6)
    ref = ref_weiszfeld(x, p, 1e-6, 10)
    out = merge("geometric_median", tvs, w)
    assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # and it (nearly) minimises sum p_i ||v - tau_i||: better than the mean and every client
    obj = lambda v: sum(p[i] * np.linalg.norm(v - x[i]) for i in range(6))  # noqa: E731
    v = flat(out)
    assert obj(v) < obj(p @ x) - 1e-3
    assert all(obj(v) < obj(x[i]) for i in range(6))
    converged = ref_weiszfeld(x, p, 1e-6, 500)
    assert obj(v) - obj(converged) < 1e-3 * obj(converged)


@pytest.mark.parametrize("kw,match", [
    ({"nu": 0.0}, r"nu \(smoothing\) must be > 0"),
    ({"iters": 2.5}, "iters must be an integer >= 1"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("geometric_median", kw, match)
