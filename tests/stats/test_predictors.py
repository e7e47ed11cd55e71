"""fl_merge/stats/predictors.py against independent references: the least-squares line and
leave-one-group-out predictions written out with numpy (np.polyfit) and by scikit-learn
(LinearRegression, LeaveOneGroupOut, cross_val_predict, r2_score), the cluster bootstrap
as a loop of sklearn calls, and Kendall's tau by counting concordant pairs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fl_merge.stats.predictors import (
    bootstrap_r2,
    fit_line,
    heldout_r2,
    in_sample_r2,
    logo_predictions,
    point_kendall,
    rank_predictors,
)


def _data(seed: int = 0, points: int = 6, reps: int = 4):
    """Runs in points: a point effect plus run noise; x informative about y."""
    rng = np.random.default_rng(seed)
    x, y, g = [], [], []
    for p in range(points):
        center = rng.uniform(0, 1)
        shift = rng.normal(0, 0.1)
        for _ in range(reps):
            xv = center + rng.normal(0, 0.05)
            x.append(xv)
            y.append(2.0 * xv - 0.5 + shift + rng.normal(0, 0.05))
            g.append(f"p{p}")
    return np.array(x), np.array(y), g


def _sklearn_logo_r2(x, y, g):
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict

    pred = cross_val_predict(LinearRegression(), np.asarray(x).reshape(-1, 1), y, groups=g,
                             cv=LeaveOneGroupOut())
    return pred, r2_score(y, pred)


def test_fit_line_is_numpy_polyfit_and_flat_without_spread():
    x, y, _ = _data()
    b, a = np.polyfit(x, y, 1)
    assert fit_line(x, y) == pytest.approx((a, b), rel=1e-10)
    assert fit_line([0.3, 0.3, 0.3], [1.0, 2.0, 6.0]) == (pytest.approx(3.0), 0.0)
    with pytest.raises(ValueError, match="as many x as y"):
        fit_line([1.0], [1.0, 2.0])


def test_leave_one_point_out_matches_numpy_by_hand_and_sklearn():
    x, y, g = _data(1)
    # by hand: for each point, np.polyfit on the others, predict its runs
    ga = np.array(g)
    want = np.empty_like(y)
    for p in dict.fromkeys(g):
        b, a = np.polyfit(x[ga != p], y[ga != p], 1)
        want[ga == p] = a + b * x[ga == p]
    assert logo_predictions(x, y, g) == pytest.approx(want, rel=1e-10)
    r2_hand = 1 - ((y - want) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    pred, r2_sk = _sklearn_logo_r2(x, y, g)
    assert pred == pytest.approx(want, rel=1e-8)
    assert heldout_r2(x, y, g) == pytest.approx(r2_hand, rel=1e-10) == pytest.approx(r2_sk, rel=1e-8)
    # in-sample R^2 of a one-variable line is the squared Pearson correlation
    assert in_sample_r2(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-10)


def test_held_out_r2_is_below_leave_one_run_out_when_points_shift_together():
    """Replicates of a point share a shift: leaving out one run keeps its point-mates in the
    fit and flatters the line; leaving out the point does not."""
    x, y, g = _data(2, points=5, reps=6)
    _, r2_runs = _sklearn_logo_r2(x, y, list(range(len(y))))  # one group per run
    assert heldout_r2(x, y, g) < r2_runs


def test_a_useless_measure_predicts_worse_than_the_mean():
    rng = np.random.default_rng(5)
    g = [f"p{i // 3}" for i in range(24)]
    y = rng.normal(size=24)
    x = rng.normal(size=24)
    assert heldout_r2(x, y, g) < 0.05


def test_cluster_bootstrap_is_the_loop_of_sklearn_fits_it_documents():
    from sklearn.metrics import r2_score

    x, y, g = _data(3, points=5, reps=3)
    names = list(dict.fromkeys(g))
    members = [[i for i, gi in enumerate(g) if gi == n] for n in names]
    rng = np.random.default_rng(7)
    values = []
    for _ in range(200):
        draw = rng.integers(0, len(names), len(names))
        if len(set(draw.tolist())) < 3:
            continue
        idx = [i for d in draw for i in members[d]]
        pred, _ = _sklearn_logo_r2(x[idx], y[idx], [g[i] for i in idx])
        values.append(r2_score(y[idx], pred))
    lo, hi, n = bootstrap_r2(x, y, g, num_resamples=200, seed=7)
    assert n == len(values)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), rel=1e-8)
    assert lo <= heldout_r2(x, y, g) <= hi


def test_an_exact_line_has_r2_one_in_every_resample():
    x = np.repeat([0.0, 1.0, 2.0, 3.0], 3) + np.tile([0.0, 0.1, 0.2], 4)
    y = 3.0 * x + 1.0
    g = np.repeat(["a", "b", "c", "d"], 3)
    assert heldout_r2(x, y, g) == pytest.approx(1.0)
    lo, hi, n = bootstrap_r2(x, y, g, num_resamples=100, seed=0)
    assert n > 50 and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_point_kendall_counts_concordant_pairs_of_point_means():
    x = [1.0, 1.2, 2.0, 2.1, 3.0, 2.9, 4.0, 4.2]
    y = [0.5, 0.7, 0.2, 0.4, 0.9, 1.1, 0.8, 0.6]
    g = ["a", "a", "b", "b", "c", "c", "d", "d"]
    mx = [1.1, 2.05, 2.95, 4.1]
    my = [0.6, 0.3, 1.0, 0.7]
    pairs = list(itertools.combinations(range(4), 2))
    conc = sum(np.sign(mx[i] - mx[j]) * np.sign(my[i] - my[j]) for i, j in pairs)
    tau, p = point_kendall(x, y, g)
    assert tau == pytest.approx(conc / len(pairs))  # no ties: tau-a = tau-b = 2/6
    assert 0 < p <= 1


def test_rank_predictors_orders_by_held_out_r2_and_skips_missing_values():
    x, y, g = _data(4, points=6, reps=3)
    rng = np.random.default_rng(9)
    noise = rng.normal(size=len(y))
    partial = x.copy()
    partial[:3] = np.nan  # the first point has no value of this measure
    few = [math.nan] * 15 + list(x[15:])
    rows = rank_predictors({"noise": noise, "good": x, "partial": partial, "few": few}, y, g, num_resamples=100)
    assert [r["measure"] for r in rows][:1] == ["good"]
    by = {r["measure"]: r for r in rows}
    assert by["good"]["r2_heldout"] == pytest.approx(heldout_r2(x, y, g))
    assert by["good"]["slope"] == pytest.approx(np.polyfit(x, y, 1)[0])
    assert by["partial"]["n_runs"] == 15 and by["partial"]["n_points"] == 5
    assert by["partial"]["r2_heldout"] == pytest.approx(heldout_r2(x[3:], y[3:], g[3:]))
    assert by["few"]["n_points"] == 1 and math.isnan(by["few"]["r2_heldout"])
    assert rows[-1]["measure"] == "few"
    with pytest.raises(ValueError, match="3 values for 18 runs"):
        rank_predictors({"bad": [1.0, 2.0, 3.0]}, y, g)
