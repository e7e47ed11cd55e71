"""Which measured quantity predicts a loss across runs (issue 27 item 4's dose-response).

The data are runs grouped into points: a point is one configuration, its runs the replicates
(seeds). Replicates of a point share everything but their seeds, so they are correlated, and
a fit judged on a run whose point-mates it was trained on is judged too kindly. Everything
here therefore holds out or resamples whole points:

* `fit_line`: the least-squares line y = a + b x of one measure (one variable);
* `logo_predictions` / `heldout_r2`: leave-one-POINT-out cross-validation. Each point's runs
  are predicted by the line fitted on all the other points' runs; the held-out R^2 is
  1 - sum_r (y_r - yhat_r)^2 / sum_r (y_r - mean(y))^2 over every run, the mean over all runs
  (the pooled out-of-fold R^2, what sklearn's r2_score of cross_val_predict with
  LeaveOneGroupOut gives). It is below 0 when the line predicts worse than the mean;
* `bootstrap_r2`: a percentile interval for that R^2 by the cluster bootstrap over points
  (Davison & Hinkley 1997, sec. 3.8; Field & Welsh 2007): draw as many points as there are,
  with replacement, keep all their runs, and compute the held-out R^2 again, leaving out
  every copy of a point together;
* `point_kendall`: Kendall's tau-b between the per-point means of a measure and of the loss
  (scipy.stats.kendalltau): whether the measure orders the points as measured;
* `rank_predictors`: all of it for several measures, best held-out R^2 first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
NUM_RESAMPLES = 2000
MIN_POINTS = 3  # a held-out fit needs at least two other points to draw a line through


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(intercept a, slope b) of the ordinary least-squares line y = a + b x. When x does not
    vary the slope is unidentified: b = 0 and a = mean(y) (the intercept-only fit).
    ValueError for no values or unequal lengths."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xa) != len(ya) or len(xa) == 0:
        raise ValueError(f"fit_line needs as many x as y values, at least one; got {len(xa)} and {len(ya)}")
    if float(np.ptp(xa)) == 0.0:
        return float(ya.mean()), 0.0
    dx = xa - xa.mean()
    b = float(dx @ (ya - ya.mean())) / float(dx @ dx)
    return float(ya.mean() - b * xa.mean()), b


def _check(x: Sequence[float], y: Sequence[float], groups: Sequence[Any]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ga = np.asarray([str(g) for g in groups])
    if not len(xa) == len(ya) == len(ga):
        raise ValueError(f"x, y and groups must have one entry per run; got {len(xa)}, {len(ya)}, {len(ga)}")
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise ValueError("x and y must be finite (drop the runs without a value first)")
    return xa, ya, ga


def logo_predictions(x: Sequence[float], y: Sequence[float], groups: Sequence[Any]) -> np.ndarray:
    """Each run's prediction by the line (`fit_line`) fitted on the runs of every OTHER group
    (leave one group out). ValueError with fewer than MIN_POINTS groups."""
    xa, ya, ga = _check(x, y, groups)
    names = list(dict.fromkeys(ga))
    if len(names) < MIN_POINTS:
        raise ValueError(f"leave-one-point-out needs at least {MIN_POINTS} points, got {len(names)}")
    pred = np.empty_like(ya)
    for g in names:
        out = ga == g
        a, b = fit_line(xa[~out], ya[~out])
        pred[out] = a + b * xa[out]
    return pred


def heldout_r2(x: Sequence[float], y: Sequence[float], groups: Sequence[Any]) -> float:
    """1 - sum (y - yhat)^2 / sum (y - mean y)^2 with yhat from `logo_predictions`; NaN when
    y does not vary (no variance to explain)."""
    ya = np.asarray(y, dtype=float)
    pred = logo_predictions(x, y, groups)
    tss = float(((ya - ya.mean()) ** 2).sum())
    return math.nan if tss == 0.0 else 1.0 - float(((ya - pred) ** 2).sum()) / tss


def in_sample_r2(x: Sequence[float], y: Sequence[float]) -> float:
    """R^2 of the line fitted on all runs (squared Pearson correlation); NaN when y does not vary."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    a, b = fit_line(xa, ya)
    tss = float(((ya - ya.mean()) ** 2).sum())
    return math.nan if tss == 0.0 else 1.0 - float(((ya - a - b * xa) ** 2).sum()) / tss


def bootstrap_r2(x: Sequence[float], y: Sequence[float], groups: Sequence[Any],
                 num_resamples: int = NUM_RESAMPLES, seed: int = 0, level: float = LEVEL
                 ) -> tuple[float, float, int]:
    """(low, high, n_valid): the percentile interval of `heldout_r2` over cluster-bootstrap
    resamples of the points. Each resample draws G point indices with
    numpy.random.default_rng(seed).integers(0, G, G) (points in first-seen order), keeps all
    runs of each drawn point (a point drawn twice contributes its runs twice, under one label,
    so leave-one-point-out leaves both copies out). A resample with fewer than MIN_POINTS
    distinct points, or whose y does not vary, has no held-out R^2 and is skipped; n_valid
    counts the others (NaN bounds when none)."""
    xa, ya, ga = _check(x, y, groups)
    names = list(dict.fromkeys(ga))
    members = [np.flatnonzero(ga == g) for g in names]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_resamples):
        draw = rng.integers(0, len(names), len(names))
        if len(set(draw.tolist())) < MIN_POINTS:
            continue
        idx = np.concatenate([members[d] for d in draw])
        r2 = heldout_r2(xa[idx], ya[idx], ga[idx])
        if not math.isnan(r2):
            values.append(r2)
    if not values:
        return math.nan, math.nan, 0
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi), len(values)


def point_means(values: Sequence[float], groups: Sequence[Any]) -> dict[str, float]:
    """group -> mean of its values, groups in first-seen order."""
    va, ga = np.asarray(values, dtype=float), np.asarray([str(g) for g in groups])
    return {g: float(va[ga == g].mean()) for g in dict.fromkeys(ga)}


def point_kendall(x: Sequence[float], y: Sequence[float], groups: Sequence[Any]) -> tuple[float, float]:
    """(tau, two-sided p) of Kendall's tau-b (scipy.stats.kendalltau) between the per-point
    means of x and of y; NaN with fewer than 2 points or without variation."""
    mx, my = point_means(x, groups), point_means(y, groups)
    if len(mx) < 2:
        return math.nan, math.nan
    res = sps.kendalltau([mx[g] for g in mx], [my[g] for g in mx])
    return float(res.statistic), float(res.pvalue)


def rank_predictors(measures: Mapping[str, Sequence[float]], y: Sequence[float], groups: Sequence[Any],
                    num_resamples: int = NUM_RESAMPLES, seed: int = 0, level: float = LEVEL
                    ) -> list[dict[str, Any]]:
    """One row per measure, best held-out R^2 first (measures without one last): its runs with
    a finite value of both the measure and y (n_runs, n_points), the line fitted on all of
    them (intercept, slope), in-sample R^2, leave-one-point-out R^2 with its cluster-bootstrap
    interval (r2_low, r2_high, n_resamples_valid: `bootstrap_r2`, the same seed for every
    measure), and Kendall's tau over the point means (`point_kendall`)."""
    ya_all = np.asarray(y, dtype=float)
    ga_all = np.asarray([str(g) for g in groups])
    rows = []
    for name, values in measures.items():
        xa_all = np.asarray(values, dtype=float)
        if len(xa_all) != len(ya_all) or len(ga_all) != len(ya_all):
            raise ValueError(f"measure '{name}' has {len(xa_all)} values for {len(ya_all)} runs")
        keep = np.isfinite(xa_all) & np.isfinite(ya_all)
        xa, ya, ga = xa_all[keep], ya_all[keep], ga_all[keep]
        n_points = len(set(ga.tolist()))
        row: dict[str, Any] = {"measure": name, "n_runs": int(keep.sum()), "n_points": n_points}
        if n_points < MIN_POINTS:
            row.update(intercept=math.nan, slope=math.nan, r2_in_sample=math.nan, r2_heldout=math.nan,
                       r2_low=math.nan, r2_high=math.nan, n_resamples_valid=0,
                       kendall_tau=math.nan, kendall_p=math.nan)
        else:
            a, b = fit_line(xa, ya)
            lo, hi, n_valid = bootstrap_r2(xa, ya, ga, num_resamples, seed, level)
            tau, p = point_kendall(xa, ya, ga)
            row.update(intercept=a, slope=b, r2_in_sample=in_sample_r2(xa, ya),
                       r2_heldout=heldout_r2(xa, ya, ga), r2_low=lo, r2_high=hi,
                       n_resamples_valid=n_valid, kendall_tau=tau, kendall_p=p)
        rows.append(row)
    return sorted(rows, key=lambda r: (math.isnan(r["r2_heldout"]), -r["r2_heldout"]
                                       if not math.isnan(r["r2_heldout"]) else 0.0))
