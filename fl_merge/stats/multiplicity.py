"""Multiple-comparison control for the tables that mark differences.

A table that compares M methods with a reference at 95% each marks, by chance alone, about
0.05 M of them when nothing differs. Every mark fl-merge draws is therefore made on
p-values adjusted over the table's family (all the comparisons the table shows against
its reference):

* "holm" (default): Holm's step-down procedure (Holm 1979, "A simple sequentially rejective
  multiple test procedure"), which controls the family-wise error rate at alpha under any
  dependence between the comparisons;
* "bh": Benjamini & Hochberg (1995), which controls the false discovery rate instead
  (independent or positively dependent tests);
* "none": the raw p-values (for reading only; tables say so).

The arithmetic is statsmodels' `multipletests`; a comparison without a p-value (NaN: one
seed, or a difference that is exactly 0 in every seed) is not part of the family and keeps
NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
CORRECTIONS = {"holm": "holm", "bh": "fdr_bh", "none": None}
NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no correction"}


def check_correction(name: str) -> str:
    """`name` when it is a known correction; ValueError naming the known ones otherwise."""
    if name not in CORRECTIONS:
        raise ValueError(f"unknown multiple-comparison correction {name!r}; "
                         f"use one of {', '.join(CORRECTIONS)}")
    return name


def paired_p_value(differences: Sequence[float]) -> float:
    """Two-sided p-value of the one-sample t test that the mean of per-replicate paired
    differences is 0 (scipy.stats.ttest_1samp); NaN with fewer than 2 values. Without
    spread (every difference the same) the t statistic is undefined: NaN when they are all 0
    (a method identical to the reference is no comparison), 0.0 when they are all the same
    non-zero value (the same gap in every replicate). NaN values are ignored."""
    d = np.asarray([float(v) for v in differences if not math.isnan(float(v))])
    if len(d) < 2:
        return math.nan
    if float(np.ptp(d)) == 0.0:
        return math.nan if d[0] == 0.0 else 0.0
    return float(sps.ttest_1samp(d, 0.0).pvalue)


def p_from_t_interval(diff: float, low: float, high: float, n: int, level: float = 0.95) -> float:
    """The paired t test's two-sided p-value recovered from the t interval it shares its
    statistic with: for n per-replicate differences with mean `diff` and interval
    diff +- t_{n-1,(1+level)/2} s / sqrt(n) = [low, high], the standard error is
    (high - low) / 2 / t_{n-1,(1+level)/2}, t = diff / se, p = 2 P(T_{n-1} > |t|). Exactly
    `paired_p_value` of the differences, for tables that kept the interval but not the
    per-seed values. Same conventions: NaN with n < 2 or a NaN bound; an interval of no
    width is NaN when diff is 0 and 0.0 otherwise."""
    if n < 2 or any(math.isnan(float(v)) for v in (diff, low, high)):
        return math.nan
    half = (float(high) - float(low)) / 2
    if half <= 0.0:
        return math.nan if float(diff) == 0.0 else 0.0
    se = half / float(sps.t.ppf((1 + level) / 2, n - 1))
    return float(2 * sps.t.sf(abs(float(diff)) / se, n - 1))


def adjust(p_values: Sequence[float], correction: str = "holm") -> list[float]:
    """The adjusted p-values of one family, in the given order (NaN entries stay NaN and
    are left out of the family)."""
    method = CORRECTIONS[check_correction(correction)]
    p = [float(v) for v in p_values]
    live = [i for i, v in enumerate(p) if not math.isnan(v)]
    out = [math.nan] * len(p)
    if not live:
        return out
    if method is None:
        adjusted = [p[i] for i in live]
    else:
        from statsmodels.stats.multitest import multipletests

        adjusted = multipletests([p[i] for i in live], alpha=ALPHA, method=method)[1]
    for i, v in zip(live, adjusted):
        out[i] = float(v)
    return out


def caption(correction: str, family_size: int, reference: str) -> str:
    """The sentence a table prints beside its marks: what a mark means and over what family."""
    name = NAMES[check_correction(correction)]
    if correction == "none":
        return f"* = raw p < {ALPHA} vs {reference}, NOT corrected for the {family_size} comparisons"
    return (f"* = {name}-adjusted p < {ALPHA} over the family of {family_size} comparisons vs "
            f"{reference} in this table (paired t test over seeds)")
