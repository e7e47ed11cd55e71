"""minimum_detectable_difference (fl_merge/stats/intervals.py) against the power of the
paired t test written out with scipy's noncentral t distribution."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from fl_merge.stats.intervals import minimum_detectable_difference


def power_by_hand(delta: float, sd: float, n: int, alpha: float) -> float:
    """P(|T| > t_{1-alpha/2, n-1}) for T noncentral t with n - 1 df, noncentrality
    delta / (sd / sqrt(n))."""
    crit = sps.t.ppf(1 - alpha / 2, n - 1)
    nc = delta / (sd / math.sqrt(n))
    lower = sps.nct.cdf(-crit, n - 1, nc)  # NaN far in the tail in some scipy versions: it is ~0 there
    return float(sps.nct.sf(crit, n - 1, nc) + (0.0 if math.isnan(lower) else lower))


@pytest.mark.parametrize("sd, n, alpha", [(0.02, 10, 0.05), (0.02, 10, 0.05 / 3), (0.05, 3, 0.05),
                                         (0.05, 3, 0.05 / 3), (1.0, 30, 0.01)])
def test_the_difference_is_detected_with_the_asked_power(sd, n, alpha):
    mdd = minimum_detectable_difference(sd, n, alpha, 0.8)
    assert power_by_hand(mdd, sd, n, alpha) == pytest.approx(0.8, abs=1e-6)
    assert power_by_hand(0.9 * mdd, sd, n, alpha) < 0.8


def test_it_agrees_with_statsmodels_where_statsmodels_converges():
    from statsmodels.stats.power import TTestPower

    for n, alpha in ((10, 0.05), (10, 0.05 / 3), (20, 0.01)):
        d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=0.8,
                                     alternative="two-sided")
        assert minimum_detectable_difference(1.0, n, alpha) == pytest.approx(d, rel=1e-5)


def test_more_replicates_detect_less_and_degenerate_inputs_give_nan():
    assert minimum_detectable_difference(0.02, 20) < minimum_detectable_difference(0.02, 10)
    assert minimum_detectable_difference(0.0, 10) == 0.0
    assert math.isnan(minimum_detectable_difference(0.02, 1))
    assert math.isnan(minimum_detectable_difference(math.nan, 10))
