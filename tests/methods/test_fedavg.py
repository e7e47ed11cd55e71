"""fedavg / task_arithmetic against the weighted mean written out in numpy."""

from __future__ import annotations

import pytest

from fl_merge.methods import merge
from methods.helpers import WEIGHTS, assert_close, make_tvs, norm_p, stack


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("method", ["fedavg", "task_arithmetic"])
def test_fedavg(method, w):
    tvs = make_tvs(6)
    x, p = stack(tvs), norm_p(w, 6)
    ref = sum(p[i] * x[i] for i in range(6))
    assert_close(merge(method, tvs, w), ref)
