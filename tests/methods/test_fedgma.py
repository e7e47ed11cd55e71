"""FedGMA against its masked mean written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from fl_merge.methods import merge
from methods.helpers import WEIGHTS, assert_close, assert_refused, flat, make_tvs, norm_p, stack


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("w", WEIGHTS)
def test_fedgma(rho, w):
    tvs = make_tvs(6, 2)
    x, p = stack(tvs), norm_p(w, 6)
    ref = np.zeros(x.shape[1])
    for j in range(x.shape[1]):
        a = abs(sum(p[i] * np.sign(x[i, j]) for i in range(6)))
        m = 1.0 if a >= rho else a
        ref[j] = m * sum(p[i] * x[i, j] for i in range(6))
    out = merge("fedgma", tvs, w, rho=rho)
    assert_close(out, ref)
    if rho > 0:  # the mask really bites somewhere
        assert not np.allclose(flat(out), sum(p[i] * x[i] for i in range(6)))


@pytest.mark.parametrize("kw,match", [
    ({"rho": 1.5}, r"rho must lie in \[0, 1\], got 1.5"),
    ({"rho": -0.1}, r"rho must lie in \[0, 1\]"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("fedgma", kw, match)
