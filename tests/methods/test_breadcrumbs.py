"""Model Breadcrumbs against its per-tensor masks written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from fl_merge.methods import merge
from methods.helpers import SHAPES, WEIGHTS, assert_close, assert_refused, make_tvs, norm_p


def ref_breadcrumbs(tvs, p, beta, gamma):
    out = {}
    for key, shp in SHAPES.items():
        acc = np.zeros(int(np.prod(shp, dtype=int)))
        for i, tv in enumerate(tvs):
            v = tv[key].double().numpy().reshape(-1)
            n = v.size
            rank = np.empty(n, dtype=int)
            rank[np.argsort(np.abs(v), kind="stable")] = np.arange(n)
            keep = (rank >= int(gamma * n)) & (rank < n - int(beta * n))
            acc += p[i] * np.where(keep, v, 0.0)
        out[key] = acc
    return np.concatenate([out[k] for k in SHAPES])


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("beta,gamma", [(0.01, 0.85), (0.1, 0.3), (0.0, 0.5), (0.2, 0.0), (0.0, 0.0)])
def test_breadcrumbs(w, beta, gamma):
    tvs = make_tvs(6, 14)
    p = norm_p(w, 6)
    assert_close(merge("breadcrumbs", tvs, w, beta=beta, gamma=gamma),
                 ref_breadcrumbs(tvs, p, beta, gamma))


@pytest.mark.parametrize("kw,match", [
    ({"beta": 0.5, "gamma": 0.5}, "beta \\+ gamma < 1"),
    ({"gamma": -0.1}, r"must lie in \[0, 1\)"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("breadcrumbs", kw, match)
