"""experiments/dose_response.py and its helpers (_dose.py, _dose_plots.py), without training:
the points resolve as run configs, the training-heterogeneity points keep their mean
(checked with numpy), replicates use independent seeds away from the design seeds, the
multi-task reference is shared exactly where its inputs are equal, the tables of hand-made
run directories match scipy's t intervals and Holm written out, and --dry-run's plan and
estimate."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from holm_reference import holm_by_hand
from scipy import stats as sps

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """The experiment module as the script imports it (one module object: its dataclasses
    and _dose's constants are the script's own)."""
    if str(ROOT / "experiments") not in sys.path:
        sys.path.insert(0, str(ROOT / "experiments"))
    return importlib.import_module(name)


dose = _load("_dose")
dr = _load("dose_response")


def _resolve(overrides):
    from fl_merge.config.run_config import RunConfig

    return RunConfig.from_flower({**overrides, "output-dir": "/tmp/unused"}).resolve()


def test_every_point_resolves_with_the_new_seed_scheme_and_its_methods():
    assert len(dose.POINTS) == len(dose.BY_NAME) == 13
    for p in dose.POINTS:
        for r in (0, 1):
            o = dose.run_overrides(p, r)
            res = _resolve(o)
            assert o["client-seeds"] == "spawn" and o["partition-probe"] == "heldout"
            assert [m for m, _ in res.methods] == list(dose.METHODS) and res.run.search == "paper"
            assert res.run.prescreen == 0.25 and res.run.finalists == 3 and len(res.tasks) == 4
            _resolve(dose.multitask_key(o)[1])  # the reference's own overrides resolve too
    assert _resolve(dose.run_overrides(dose.BY_NAME["skew-a0.03"], 0)).run.alpha == 0.03
    assert _resolve(dose.run_overrides(dose.BY_NAME["tasks-mid"], 0)).tasks == [
        "rotate90", "rot180-5to9", "parity", "digits8x8"]
    # every series names known points, in order of increasing heterogeneity
    assert all(p in dose.BY_NAME for doses in dose.SERIES.values() for p, _ in doses)
    assert [p for p, _ in dose.SERIES["label skew (rotate90 split)"]] == [
        "skew-iid", "skew-a10", "skew-a1", "skew-a0.3", "skew-a0.1", "skew-a0.03"]


@pytest.mark.parametrize("key, names, mean", [("local_steps", ("steps-mild", "steps-wide"), 150.0),
                                              ("lrs", ("lr-mild", "lr-wide"), 0.01)])
def test_training_spreads_keep_the_arithmetic_mean_and_grow(key, names, mean):
    base = getattr(_resolve(dose.run_overrides(dose.BY_NAME[dose.SUITE], 0)), key)
    assert base == [mean] * 4
    cvs = []
    for name in names:
        per_rep = [np.array(getattr(_resolve(dose.run_overrides(dose.BY_NAME[name], r)), key), dtype=float)
                   for r in range(4)]
        for v in per_rep:
            assert v.mean() == pytest.approx(mean, rel=1e-12)
        # the rotation: over K replicates every client gets every value exactly once
        assert all(sorted(col) == sorted(per_rep[0]) for col in np.array(per_rep).T)
        cvs.append(per_rep[0].std() / per_rep[0].mean())  # population CV, numpy
    assert 0 < cvs[0] < cvs[1]


def test_spread_points_share_the_clients_that_keep_the_mean_with_the_reference_run():
    """Their client-update cache specs (task, data, seed, steps, lr, extras asked for) equal
    the headroom-v2 run's for exactly the two clients at the mean value: those never train."""
    from fl_merge_clients.client_app import train_values, update_spec

    from fl_merge.round.merging import given_params, train_requests

    def specs(name, r):
        res = _resolve(dose.run_overrides(dose.BY_NAME[name], r))
        cfg = {**res.train_config(), **train_requests(given_params(res.methods), True)}
        return [update_spec(cfg, i, train_values(cfg, i)) for i in range(4)]

    for r in (0, 3):
        ref = specs(dose.SUITE, r)
        assert all(s.get("compute-gram") and s.get("compute-grad0") for s in ref)  # regmean, measures
        for name in ("steps-mild", "steps-wide", "lr-mild", "lr-wide"):
            assert sum(a == b for a, b in zip(specs(name, r), ref)) == 2


def test_replicates_have_independent_seeds_away_from_the_design_seeds():
    seeds = dose.replicate_seeds(10)
    assert seeds == list(range(10, 20)) and not set(seeds) & {1000, 1001}
    client = []
    for r, s in enumerate(seeds):
        o = dose.run_overrides(dose.BY_NAME[dose.SUITE], r)
        assert o["seed"] == o["data-seed"] == s
        client += _resolve(o).seeds
    assert len(set(client)) == 40  # no two clients of any replicates share a training seed
    with pytest.raises(ValueError, match="design seeds"):
        dose.replicate_seeds(1000)


def test_the_multitask_reference_is_shared_exactly_where_its_inputs_are_equal():
    keys = {(p.name, r): dose.multitask_key(dose.run_overrides(p, r)) for p in dose.POINTS for r in (0, 1)}
    spread = [dose.SUITE, "steps-mild", "steps-wide", "lr-mild", "lr-wide"]
    assert len({keys[(n, 0)][0] for n in spread}) == 1  # same data, seeds, mean steps and lr
    assert keys[(dose.SUITE, 0)][2:] == (150, 0.01)
    assert keys[(dose.SUITE, 0)][0] != keys[(dose.SUITE, 1)][0]
    assert len({k[0] for k in keys.values()}) == 2 * 9  # 9 distinct references per replicate


def test_select_points_by_point_and_series_names():
    got = dose.select_points("tasks-near,lr spread (mean 0.01)")
    assert [p.name for p in got] == ["tasks-near", dose.SUITE, "lr-mild", "lr-wide"]
    with pytest.raises(ValueError, match="unknown point or series 'nope'"):
        dose.select_points("nope")


# ---------------------------------------------------------------------- hand-made runs

TASKS = ["a", "b", "c", "d"]


def _acc(point: str, seed: int) -> dict[str, float]:
    """Accuracies of one fake run, a fixed function of (point, seed)."""
    rng = np.random.default_rng([sum(map(ord, point)), seed])
    ta = 0.70 + 0.02 * rng.standard_normal()
    return {"task_arithmetic": ta, "ties": ta + 0.03 + 0.01 * rng.standard_normal(),
            "tsv_m": ta + 0.001 * rng.standard_normal(), "regmean": ta - 0.02 + 0.01 * rng.standard_normal(),
            "base": ta - 0.1 + 0.01 * rng.standard_normal(),
            "individual": ta + 0.1 + 0.02 * rng.standard_normal(),
            "multitask": ta + 0.05 + 0.02 * rng.standard_normal(), "cos": float(rng.uniform(0, 1))}


def _fake_run(p, mt_path: Path) -> None:
    """A finished run as write_outputs leaves it (run.json, results.csv; every task scored the
    run's accuracy) and its multi-task reference file."""
    from fl_merge.io.results import write_rows

    acc = _acc(p.point.name, p.seed)
    p.run_dir.mkdir(parents=True)
    rows = []
    for m in dose.METHODS:
        for t in TASKS:
            common = {"method": m, "task": t, "split": "test"}
            rows += [{**common, "model": "base", "eta": 0.0, "selected": False, "accuracy": acc["base"]},
                     {**common, "model": "merged", "eta": 0.5, "selected": True, "accuracy": acc[m]},
                     {**common, "model": "merged", "eta": 1.0, "selected": False, "accuracy": 0.0},
                     {**common, "model": "finetuned", "eta": math.nan, "selected": False,
                      "accuracy": acc["individual"]}]
    write_rows(p.run_dir / "results.csv", rows)
    run = {"config": p.overrides, "tasks": TASKS,
           "methods": {m: {"name": m, "params": {}} for m in dose.METHODS},
           "heterogeneity": {"mean_cosine": acc["cos"], "steps_cv": 0.0},
           "clients": [{"lr": 0.01, "train-seconds": 10.0, "cached": 0}] * 3
           + [{"lr": 0.01, "train-seconds": 99.0, "cached": 1}],  # from the cache: did not train here
           "timings": {"aggregate-seconds": 2.0, "validation-evaluate-seconds": 30.0,
                       "test-evaluate-seconds": 5.0, "total-seconds": 100.0}}
    (p.run_dir / "run.json").write_text(json.dumps(run))
    (p.run_dir / dr.WALL_FILE).write_text(json.dumps({"wall": 120.0}))
    if not mt_path.exists():
        mt_path.parent.mkdir(parents=True, exist_ok=True)
        mt_path.write_text(json.dumps({"rows": [{"multitask-test-accuracy": acc["multitask"]}],
                                       "seconds": {"total": 50.0}}))


def test_tables_of_hand_made_runs(tmp_path):
    from fl_merge.io.results import read_rows

    out, docs = tmp_path / "out", tmp_path / "docs"
    names = ["skew-iid", "skew-a10", "skew-a1"]
    runs = dr.plan(dose.select_points(",".join(names)), 3, out)
    for p in runs:
        _fake_run(p, dr.mt_file(out, p.mt_key))
    dr.main(["--tables-only", "--replicates", "3", "--points", ",".join(names), "--out", str(out),
             "--docs", str(docs)])
    rows = {(r["setting"], r["model"]): r for r in read_rows(docs / "dose_response.csv")}
    accs = [_acc("skew-iid", s) for s in (10, 11, 12)]
    # TA's loss against the individual models: individual - TA per replicate, t interval by hand
    d = np.array([a["individual"] - a["task_arithmetic"] for a in accs])
    half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    r = rows[("skew-iid", "individual")]
    assert r["diff"] == pytest.approx(d.mean()) and r["diff_high"] == pytest.approx(d.mean() + half)
    mt = np.array([a["multitask"] - a["task_arithmetic"] for a in accs])
    assert rows[("skew-iid", "multitask")]["diff"] == pytest.approx(mt.mean())
    assert rows[("skew-a10", "ties")]["series"] == "label skew (rotate90 split): alpha 10"
    # Holm within the point: the 3 methods one family, the 3 references another
    for kind in (("ties", "tsv_m", "regmean"), ("base", "individual", "multitask")):
        raw = [sps.ttest_1samp([a[m] - a["task_arithmetic"] for a in accs], 0.0).pvalue for m in kind]
        for m, q in zip(kind, holm_by_hand(raw)):
            assert rows[("skew-iid", m)]["p_adjusted"] == pytest.approx(q)
            assert rows[("skew-iid", m)]["significant"] == (q < 0.05)
    assert rows[("skew-iid", "ties")]["family"] == "holm over 3 methods vs task_arithmetic at skew-iid"
    # the minimum detectable difference: 80% power at 0.05 / 3 with the measured spread, by
    # the power of the paired t test written out with scipy's noncentral t
    sd_ties = np.std([a["ties"] - a["task_arithmetic"] for a in accs], ddof=1)
    crit, nc = sps.t.ppf(1 - 0.05 / 6, 2), rows[("skew-iid", "ties")]["mdd"] / (sd_ties / math.sqrt(3))
    lower = sps.nct.cdf(-crit, 2, nc)
    assert sps.nct.sf(crit, 2, nc) + (0.0 if math.isnan(lower) else lower) == pytest.approx(0.8, abs=1e-6)
    # predictors: mean_cosine's held-out R^2 leaving one point out, by sklearn
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict

    all_acc = [(n, _acc(n, s)) for s in (10, 11, 12) for n in names]
    x = np.array([[a["cos"]] for _, a in all_acc])
    y = np.array([a["individual"] - a["task_arithmetic"] for _, a in all_acc])
    pred = cross_val_predict(LinearRegression(), x, y, groups=[n for n, _ in all_acc], cv=LeaveOneGroupOut())
    pr = {(r["target"], r["measure"]): r for r in read_rows(docs / "dose_response_predictors.csv")}
    assert pr[("loss_individual", "mean_cosine")]["r2_heldout"] == pytest.approx(r2_score(y, pred))
    assert pr[("loss_individual", "mean_cosine")]["n_points"] == 3
    # cost: the run.json timings split, each reference's seconds counted once
    cost = read_rows(docs / "dose_response_cost.csv")
    assert len(cost) == 9 and cost[0]["merge"] == 2.0 and cost[0]["scoring"] == 35.0
    assert cost[0]["train_and_other"] == 63.0 and cost[0]["train_client_sum"] == 30.0
    assert sum(c["multitask"] for c in cost) == 9 * 50.0  # 3 points x 3 replicates, none shared
    for f in ("dose_response_label.png", "dose_response_predictors.png", "dose_response.md"):
        assert (docs / f).stat().st_size > 0
    md = (docs / "dose_response.md").read_text()
    assert "Bound: not computed" in md and "| skew-iid | individual | 3 |" in md


def test_dry_run_lists_the_plan_and_estimates_from_timed_runs(tmp_path, capsys):
    dr.main(["--dry-run", "--replicates", "2", "--points", "steps-mild,lr-mild", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert text.count("[to run]") == 4 and "local-steps=150,150,200,100" in text  # replicate 1 rotated
    assert "planned: 4 runs (0 done, 4 to run), 2 multi-task references (0 done, 2 to compute)" in text
    assert f"estimate: {(4 * 240 + 2 * 20) / 3600:.1f} h = 4 runs x 240 s + 2 x 20 s (prior" in text
    runs = dr.plan(dose.select_points("steps-mild,lr-mild"), 2, tmp_path)
    _fake_run(runs[0], dr.mt_file(tmp_path, runs[0].mt_key))  # wall 120 s, reference 50 s
    dr.main(["--dry-run", "--replicates", "2", "--points", "steps-mild,lr-mild", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert text.count("[done]") == 1 and "3 runs x 120 s + 1 x 50 s (medians of 1 timed runs" in text


def test_the_estimate_prices_each_point_by_its_own_timed_runs():
    costs = [{"point": "a", "wall": 100.0, "total": 90.0, "multitask": 40.0},
             {"point": "a", "wall": 300.0, "total": 290.0, "multitask": 0.0},
             {"point": "b", "wall": math.nan, "total": 50.0, "multitask": 0.0}]  # made earlier: total
    est = dose.estimate_seconds(["a", "b", "c"], 2, costs)
    # a: median(100, 300) = 200; b: its own 50; c: median of all three timed = 100; references 40 each
    assert est["total"] == 200 + 50 + 100 + 2 * 40 and est["measured"] == 3
    prior = dose.estimate_seconds(["a"], 1, [])
    assert prior["total"] == dose.PRIOR_RUN_SECONDS + dose.PRIOR_MULTITASK_SECONDS


def test_execute_goes_on_past_a_failed_run_and_names_it(tmp_path, monkeypatch):
    import _runner
    import multitask_reference

    runs = dr.plan(dose.select_points("skew-iid,skew-a10"), 1, tmp_path)

    def fake_run_point(run_dir, overrides):
        if "alpha" in overrides:
            raise SystemExit("point failed: no")
        _fake_run(next(p for p in runs if p.run_dir == run_dir), tmp_path / "unused.json")

    made = []
    monkeypatch.setattr(_runner, "run_point", fake_run_point)
    monkeypatch.setattr(multitask_reference, "reference", lambda o, steps, lr: made.append((steps, lr)) or {
        "rows": [{"multitask-test-accuracy": 0.8}], "seconds": {"total": 1.0}})
    monkeypatch.setattr(multitask_reference, "write_reference", lambda res, path: path)
    failures = dr.execute(runs, tmp_path)
    assert failures == ["skew-a10 seed 10: point failed: no"]
    assert (tmp_path / "failures.txt").read_text() == failures[0] + "\n"
    assert made == [(150, 0.01)] and runs[0].done() and not runs[1].done()
    assert json.loads((runs[0].run_dir / dr.WALL_FILE).read_text())["wall"] >= 0
    points, missing = dr.collect(runs, tmp_path)
    assert [p["setting"] for p in points] == ["skew-iid"] and missing == 1


def test_dose_effects_pair_by_seed_and_holm_within_each_series():
    """Each dose against its series' first dose, paired by seed: the interval is scipy's
    one-sample t interval of the differences, p its t test, Holm (written out) per series;
    a seed missing at either point is left out."""
    rng = np.random.default_rng(0)
    points = []
    for series, doses in dose.SERIES.items():
        for i, (name, _) in enumerate(doses):
            for s in range(10, 15):
                if name == "skew-a1" and s == 14:
                    continue  # a missing run
                points.append({"setting": name, "seed": s, "acc": {"task_arithmetic": 0.9 - 0.02 * i * (
                    "skew" in name) + 0.003 * s + rng.normal(0, 0.004)}})
    got = dose.dose_effects(points)
    assert [r["point"] for r in got] == [n for doses in dose.SERIES.values() for n, _ in doses[1:]]
    acc = {(p["setting"], p["seed"]): 100 * p["acc"]["task_arithmetic"] for p in points}
    for series, doses in dose.SERIES.items():
        rows = [r for r in got if r["series"] == series]
        ps = []
        for r, (name, _) in zip(rows, doses[1:]):
            seeds = [s for s in range(10, 15) if (name, s) in acc and (doses[0][0], s) in acc]
            d = np.array([acc[(name, s)] - acc[(doses[0][0], s)] for s in seeds])
            ci = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
            assert r["n"] == len(d) and r["diff"] == pytest.approx(d.mean())
            assert (r["diff_low"], r["diff_high"]) == pytest.approx(ci)
            assert r["p_value"] == pytest.approx(sps.ttest_1samp(d, 0).pvalue)
            ps.append(r["p_value"])
        assert [r["p_adjusted"] for r in rows] == pytest.approx(holm_by_hand(ps))
    skew = [r for r in got if r["series"].startswith("label skew")]
    assert skew[1]["n"] == 4 and all(r["significant"] for r in skew[1:])  # -2 points a dose: clear


def test_dose_effects_on_the_gap_use_each_points_own_multitask_model():
    points = [{"setting": n, "seed": s, "acc": {"task_arithmetic": ta, "multitask": mt}}
              for s in (10, 11, 12)
              for n, ta, mt in (("tasks-near", 0.88 + s / 1000, 0.92), ("tasks-mid", 0.91 + s / 900, 0.96),
                                (dose.SUITE, 0.80, 0.90 + s / 800))]
    rows = {r["point"]: r for r in dose.dose_effects(points, "gap") if r["series"] == "task dissimilarity"}
    gaps = {(p["setting"], p["seed"]): 100 * (p["acc"]["multitask"] - p["acc"]["task_arithmetic"]) for p in points}
    for name in ("tasks-mid", dose.SUITE):
        d = [gaps[(name, s)] - gaps[("tasks-near", s)] for s in (10, 11, 12)]
        assert rows[name]["diff"] == pytest.approx(np.mean(d)) and rows[name]["quantity"] == "gap"
    with pytest.raises(ValueError, match="accuracy or gap"):
        dose.dose_effects(points, "loss")
