"""Confidence intervals for reported accuracies (README.md "One run path, one output layout",
Uncertainty; selection on validation only: docs/protocol.md "What the server does with the scores").

Two sources of noise, two intervals:

* over replicates (seeds): the Student t interval of the mean (`t_interval`) and of paired
  per-seed differences (`paired_t`), the differences taken between methods merged from the
  SAME client updates of one seed;
* within one run, over test examples: the paired percentile bootstrap (`bootstrap_accuracies`,
  `bootstrap_ci`), every method re-scored on the SAME resample of test examples.

`excludes_zero` is a raw interval's fact; the over-seed marks are `significant` after a
multiple-comparison correction over the table's family (fl_merge/stats/multiplicity.py); `over_seed_table`
is the one over-seed table (mean and paired difference per model, each with its t interval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

LEVEL = 0.95  # every interval here is a 95% interval unless a caller asks otherwise
NUM_RESAMPLES = 2000  # bootstrap resamples (Efron & Tibshirani 1993 suggest >= 1000 for percentile CIs)


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): mean +- t_{n-1, (1+level)/2} * s / sqrt(n), s the sample standard
    deviation (ddof 1), t the Student t quantile (scipy.stats.t.ppf). The usual small-sample
    interval for a mean (e.g. Wasserman, All of Statistics, 2004, sec. 10.4 / any intro text).

    n = 1: the spread is unknown, so low and high are NaN (the mean is still returned);
    n = 0: all three NaN. NaN values are ignored."""
    x = np.asarray([v for v in values if not math.isnan(float(v))], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if n == 1:
        return m, math.nan, math.nan
    half = float(sps.t.ppf((1 + level) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return m, m - half, m + half


def paired_t(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of the per-replicate differences a_s - b_s (`t_interval` of them): the
    paired t interval. a[s] and b[s] must come from the same replicate (same client updates)."""
    if len(a) != len(b):
        raise ValueError(f"paired differences need as many values on each side, got {len(a)} and {len(b)}")
    return t_interval([float(x) - float(y) for x, y in zip(a, b)], level)


def minimum_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean of n paired differences with standard deviation `sd` that the
    two-sided one-sample t test at level `alpha` detects with probability `power`: d * sd,
    d the standardized effect at which P(|T| > t_{1-alpha/2, n-1}) = power, T noncentral t
    with n - 1 degrees of freedom and noncentrality d sqrt(n) (Cohen 1988, ch. 2), solved
    with scipy's brentq (statsmodels' TTestPower.solve_power gives the same d where it
    converges, but not at n = 3 with alpha / 3). Under a multiple-comparison correction pass
    the level the comparison must meet (e.g. alpha / m, Holm's first step over m
    comparisons). NaN with n < 2 or a NaN sd."""
    if n < 2 or math.isnan(float(sd)):
        return math.nan
    from scipy.optimize import brentq

    df, crit = n - 1, float(sps.t.ppf(1 - alpha / 2, n - 1))

    def gap(d: float) -> float:
        nc = d * math.sqrt(n)
        # P(T < -crit) as P(T' > crit), T' with noncentrality -nc: scipy's nct.cdf far in the
        # tail can be NaN where this is a clean 0
        lower = float(sps.nct.sf(crit, df, -nc))
        return float(sps.nct.sf(crit, df, nc)) + (0.0 if math.isnan(lower) else lower) - power

    hi = 1.0
    while gap(hi) < 0:
        hi *= 2
    return float(brentq(gap, 0.0, hi, xtol=1e-12)) * float(sd)


def excludes_zero(low: float, high: float) -> bool:
    """True when the interval [low, high] lies strictly on one side of 0 (NaN: False)."""
    return bool(low > 0 or high < 0)


def over_seed_table(per_seed: Mapping[str, Sequence[float]], reference: str | None = None,
                    correction: str = "holm") -> dict[str, dict[str, Any]]:
    """The over-seed table, one implementation for the replicates (fl_merge.engine.replicates)
    and the experiments' settings (experiments/_points.py). `per_seed`: model -> its
    accuracy in each seed, the seeds in one order for every model. Per model: n_seeds and the
    `t_interval` of the mean (mean, ci_low, ci_high); given a `reference` model, also the
    `paired_t` of the per-seed differences against it (diff, diff_low, diff_high),
    excludes_zero (that raw interval's fact), the paired t test's p_value, p_adjusted over
    the table's family (every other model vs the reference; `correction`:
    fl_merge.stats.multiplicity, Holm by default) and `significant` = p_adjusted < 0.05, the
    one mark tables and plots draw (never with one seed: p is NaN there). KeyError when the
    reference is not among the models."""
    from fl_merge.stats.multiplicity import ALPHA, adjust, paired_p_value

    ref = None if reference is None else per_seed[reference]
    table = {}
    for model, values in per_seed.items():
        m, lo, hi = t_interval(values)
        row: dict[str, Any] = {"n_seeds": len(values), "mean": m, "ci_low": lo, "ci_high": hi}
        if ref is not None:
            d, dlo, dhi = paired_t(values, ref)
            p = math.nan if model == reference else paired_p_value(
                [float(x) - float(y) for x, y in zip(values, ref)])
            row.update(reference=reference, diff=d, diff_low=dlo, diff_high=dhi,
                       excludes_zero=excludes_zero(dlo, dhi), p_value=p)
        table[model] = row
    if ref is not None:
        models = list(table)
        for model, q in zip(models, adjust([table[m]["p_value"] for m in models], correction)):
            table[model].update(p_adjusted=q, correction=correction,
                                significant=bool(q < ALPHA))
    return table


def seed_marks(marks: Sequence[bool | None]) -> str:
    """'k/n': in k of n seeds a within-run interval excluded 0; '' when a seed has no mark."""
    if not marks or any(m is None for m in marks):
        return ""
    return f"{sum(bool(m) for m in marks)}/{len(marks)}"


def _check_correct(correct: Mapping[str, Mapping[str, Sequence[int]]]) -> dict[str, int]:
    """Per task its number of examples, the same for every method; ValueError otherwise."""
    methods = list(correct)
    if not methods:
        raise ValueError("bootstrap needs at least one method's per-example correctness")
    tasks = {t: len(v) for t, v in correct[methods[0]].items()}
    if not tasks or min(tasks.values()) == 0:
        raise ValueError(f"bootstrap needs test examples for every task, got sizes {tasks}")
    for m in methods[1:]:
        got = {t: len(v) for t, v in correct[m].items()}
        if got != tasks:
            raise ValueError(f"method '{m}' was scored on tasks/sizes {got}, but '{methods[0]}' on "
                             f"{tasks}: paired comparisons need the same test examples")
    return tasks


def bootstrap_accuracies(correct: Mapping[str, Mapping[str, Sequence[int]]],
                         num_resamples: int = NUM_RESAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """method -> array of `num_resamples` bootstrap replicates of its mean-over-tasks accuracy.

    correct[method][task] is the 0/1 correctness of each test example of that task. For every
    resample and task, n_t example indices are drawn with replacement (numpy Generator, seeded)
    and every method is re-scored on those SAME indices (the paired bootstrap: Efron &
    Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13; for comparing systems on one
    test set, Koehn 2004 / Berg-Kirkpatrick et al. 2012); the mean over tasks is then the
    unweighted mean of the resampled per-task accuracies, as in the run's summary."""
    sizes = _check_correct(correct)
    rng = np.random.default_rng(seed)
    arrays = {m: {t: np.asarray(v, dtype=np.float64) for t, v in per.items()} for m, per in correct.items()}
    out = {m: np.zeros(num_resamples) for m in arrays}
    chunk = max(1, 2_000_000 // max(sizes.values()))  # bounded memory for the index matrix
    for task, n in sizes.items():
        for start in range(0, num_resamples, chunk):
            stop = min(num_resamples, start + chunk)
            idx = rng.integers(0, n, size=(stop - start, n))
            for m, per in arrays.items():
                out[m][start:stop] += per[task][idx].mean(axis=1)
    return {m: v / len(sizes) for m, v in out.items()}


def percentile_ci(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval: the (1-level)/2 and (1+level)/2 quantiles of bootstrap samples
    (Efron & Tibshirani 1993, ch. 13.3)."""
    lo, hi = np.quantile(np.asarray(samples, dtype=float), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_accuracy(correct: Mapping[str, Sequence[int]]) -> float:
    """Unweighted mean over tasks of each task's fraction correct."""
    return float(np.mean([np.mean(np.asarray(v, dtype=float)) for v in correct.values()]))


def bootstrap_ci(correct: Mapping[str, Mapping[str, Sequence[int]]], reference: str | None = None,
                 num_resamples: int = NUM_RESAMPLES, seed: int = 0, level: float = LEVEL
                 ) -> dict[str, dict[str, float]]:
    """Per method: its mean-over-tasks test accuracy with a percentile bootstrap CI and, with a
    `reference` method, the paired difference (method - reference) with its CI from the same
    resamples, and whether that CI excludes 0. A method identical to the reference gets
    exactly 0 [0, 0]. Keys: accuracy, low, high (and diff, diff_low, diff_high, excludes_zero)."""
    if reference is not None and reference not in correct:
        raise ValueError(f"reference method '{reference}' is not among {sorted(correct)}")
    boot = bootstrap_accuracies(correct, num_resamples, seed)
    out: dict[str, dict[str, float]] = {}
    for m in correct:
        lo, hi = percentile_ci(boot[m], level)
        row = {"accuracy": mean_accuracy(correct[m]), "low": lo, "high": hi}
        if reference is not None:
            dlo, dhi = percentile_ci(boot[m] - boot[reference], level)
            row.update(diff=row["accuracy"] - mean_accuracy(correct[reference]), diff_low=dlo,
                       diff_high=dhi, excludes_zero=excludes_zero(dlo, dhi))
        out[m] = row
    return out


def ci_line(model: str, width: int, value: float, low: float, high: float,
            diff: tuple[float, float, float, bool] | None = None) -> str:
    """One row of a CI table: `model  0.812 [0.800, 0.824]`, and with a paired difference
    (diff, low, high, mark) `   +0.012 [+0.003, +0.020] *` (* where `mark`: the caller says
    what a mark means, e.g. significant after a multiple-comparison correction)."""
    line = f"{model:<{width}}{value:.3f} [{low:.3f}, {high:.3f}]"
    if diff is not None:
        d, dlo, dhi, mark = diff
        line += f"   {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]" + (" *" if mark else "  ")
    return line
