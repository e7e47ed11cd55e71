"""fl_merge.stats.intervals against hand computations, a normal approximation and a coverage simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fl_merge.stats import intervals as stats


def test_t_interval_matches_hand_computation_with_table_quantile():
    # values 1,2,3,4: mean 2.5, s^2 = (2.25+0.25+0.25+2.25)/3 = 5/3; t_{3, 0.975} = 3.182 (t table)
    mean, lo, hi = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert mean == 2.5
    assert lo == pytest.approx(2.5 - half, abs=1e-5) and hi == pytest.approx(2.5 + half, abs=1e-5)
    # n = 2: t_{1, 0.975} = 12.706; values 0.6, 0.8: s = 0.1414
    mean, lo, hi = stats.t_interval([0.6, 0.8])
    assert hi - mean == pytest.approx(12.7062 * math.sqrt(0.02) / math.sqrt(2), rel=1e-4)


def test_t_interval_of_one_value_has_unknown_width():
    mean, lo, hi = stats.t_interval([0.7])
    assert mean == 0.7 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in stats.t_interval([]))
    assert not stats.excludes_zero(lo, hi)


def test_paired_t_is_the_interval_of_differences():
    a, b = [0.70, 0.72, 0.75], [0.68, 0.69, 0.71]
    mean, lo, hi = stats.paired_t(a, b)
    d = [0.02, 0.03, 0.04]  # by hand; mean 0.03, s = 0.01, t_{2,0.975} = 4.303
    assert mean == pytest.approx(0.03)
    assert hi - mean == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert stats.excludes_zero(lo, hi) and sum(d) / 3 == pytest.approx(mean)
    with pytest.raises(ValueError, match="as many values"):
        stats.paired_t([1.0], [1.0, 2.0])


def test_over_seed_table_gives_each_model_its_mean_and_paired_difference_by_hand():
    table = stats.over_seed_table({"ta": [0.68, 0.69, 0.71], "ties": [0.70, 0.72, 0.75],
                                   "base": [0.40, 0.50, 0.45]}, reference="ta")
    assert list(table) == ["ta", "ties", "base"]
    ties = table["ties"]
    # ties: mean 0.7233.., s^2 = (0.0233^2 + 0.0033^2 + 0.0267^2) / 2 = 0.000633..; t_{2,0.975} = 4.303
    assert ties["n_seeds"] == 3 and ties["mean"] == pytest.approx(2.17 / 3)
    assert ties["ci_high"] - ties["mean"] == pytest.approx(4.302653 * math.sqrt(0.0019 / 3 / 3), rel=1e-4)
    # ties - ta per seed: 0.02, 0.03, 0.04 (as in the paired test above)
    assert ties["reference"] == "ta" and ties["diff"] == pytest.approx(0.03)
    assert ties["diff_high"] - 0.03 == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert ties["excludes_zero"] is True
    # base - ta: -0.28, -0.19, -0.26: mean -0.2433, all below 0 but the interval is wide
    assert table["base"]["diff"] == pytest.approx(-0.73 / 3)
    ta = table["ta"]
    assert (ta["diff"], ta["diff_low"], ta["diff_high"], ta["excludes_zero"]) == (0.0, 0.0, 0.0, False)
    plain = stats.over_seed_table({"m": [0.5]})
    assert set(plain["m"]) == {"n_seeds", "mean", "ci_low", "ci_high"} and math.isnan(plain["m"]["ci_low"])
    with pytest.raises(KeyError):
        stats.over_seed_table({"m": [0.5]}, reference="ta")


def test_seed_marks_count_the_seeds_whose_interval_excluded_zero():
    assert stats.seed_marks([True, False, True]) == "2/3"
    assert stats.seed_marks([True, None]) == "" and stats.seed_marks([]) == ""


def test_excludes_zero():
    assert stats.excludes_zero(0.01, 0.2) and stats.excludes_zero(-0.3, -0.01)
    assert not stats.excludes_zero(-0.01, 0.2) and not stats.excludes_zero(0.0, 0.0)


def test_identical_methods_give_exactly_zero_difference():
    rng = np.random.default_rng(1)
    c = {"t1": rng.integers(0, 2, 50).tolist(), "t2": rng.integers(0, 2, 80).tolist()}
    out = stats.bootstrap_ci({"ta": c, "same": dict(c)}, reference="ta", num_resamples=300)
    assert (out["same"]["diff"], out["same"]["diff_low"], out["same"]["diff_high"]) == (0.0, 0.0, 0.0)
    assert not out["same"]["excludes_zero"]
    # the accuracy is the unweighted mean of the per-task fractions correct
    assert out["ta"]["accuracy"] == pytest.approx((np.mean(c["t1"]) + np.mean(c["t2"])) / 2)
    assert out["ta"]["low"] < out["ta"]["accuracy"] < out["ta"]["high"]


def _paired(rng, n, pa, p_flip):
    """Method a correct with prob pa; b equals a except a fraction p_flip of examples flipped."""
    a = (rng.random(n) < pa).astype(int)
    flip = rng.random(n) < p_flip
    b = np.where(flip, 1 - a, a)
    return a, b


def test_bootstrap_difference_agrees_with_normal_approximation():
    rng = np.random.default_rng(0)
    a, b = _paired(rng, 20000, 0.7, 0.1)
    d = a - b
    half = 1.959964 * d.std(ddof=1) / math.sqrt(len(d))  # normal CI of a mean of paired differences
    out = stats.bootstrap_ci({"a": {"t": a}, "b": {"t": b}}, reference="b", num_resamples=1000, seed=3)
    assert out["a"]["diff"] == pytest.approx(d.mean())
    assert out["a"]["diff_low"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert out["a"]["diff_high"] == pytest.approx(d.mean() + half, abs=0.1 * half)
    # a single accuracy: the binomial normal interval
    p = a.mean()
    half_p = 1.959964 * math.sqrt(p * (1 - p) / len(a))
    assert out["a"]["low"] == pytest.approx(p - half_p, abs=0.1 * half_p)


def test_mean_over_tasks_resamples_within_each_task():
    rng = np.random.default_rng(5)
    a1, b1 = _paired(rng, 8000, 0.8, 0.1)
    a2, b2 = _paired(rng, 4000, 0.5, 0.2)
    out = stats.bootstrap_ci({"a": {"x": a1, "y": a2}, "b": {"x": b1, "y": b2}}, "b", 1000, seed=1)
    # the mean over two tasks of independent task means: variance (v1/n1 + v2/n2) / 4
    se = math.sqrt((a1 - b1).var(ddof=1) / len(a1) + (a2 - b2).var(ddof=1) / len(a2)) / 2
    centre = ((a1 - b1).mean() + (a2 - b2).mean()) / 2
    assert out["a"]["diff_low"] == pytest.approx(centre - 1.96 * se, abs=0.2 * se)
    assert out["a"]["diff_high"] == pytest.approx(centre + 1.96 * se, abs=0.2 * se)


def test_bootstrap_coverage_on_known_truth():
    # a correct w.p. 0.7; b = a flipped on 20% of examples: E[a - b] = 0.2 * (0.7 - 0.3) = 0.08
    rng = np.random.default_rng(11)
    truth, hits, trials = 0.2 * (0.7 - 0.3), 0, 200
    for i in range(trials):
        a, b = _paired(rng, 300, 0.7, 0.2)
        out = stats.bootstrap_ci({"a": {"t": a}, "b": {"t": b}}, "b", num_resamples=400, seed=i)
        hits += out["a"]["diff_low"] <= truth <= out["a"]["diff_high"]
    assert 0.88 <= hits / trials <= 0.99  # nominal 0.95; binomial sd over 200 trials ~0.015


def test_bootstrap_is_seeded_and_checks_pairing():
    c = {"a": {"t": [1, 0, 1, 1, 0]}, "b": {"t": [1, 1, 0, 1, 0]}}
    assert stats.bootstrap_ci(c, "b", 200, seed=4) == stats.bootstrap_ci(c, "b", 200, seed=4)
    with pytest.raises(ValueError, match="same test examples"):
        stats.bootstrap_ci({"a": {"t": [1, 0]}, "b": {"t": [1, 0, 1]}}, "b")
    with pytest.raises(ValueError, match="reference method 'ta' is not among"):
        stats.bootstrap_ci(c, "ta")
