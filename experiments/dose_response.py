"""Experiment: the heterogeneity effect as a dose-response (issue 27 item 4, with item 6's
cost measurement). The points, seeds and methods are experiments/_dose.py's: label skew on
rotate90 split across K=4 clients (iid, Dirichlet 10 .. 0.03), task dissimilarity (mnist-near,
mnist-mid, headroom-v2), and on headroom-v2 the spread of local steps and of learning rates
at equal arithmetic mean; at least 10 independent replicates each (seed = data-seed = 10 + r,
client-seeds=spawn).

Per run: one fl-merge run through the one run path (experiments/_runner.py run_point; Task
Arithmetic, TIES, TSV-M and RegMean merge the same client updates, each tuned on validation,
test at the choice) and the multi-task reference on the union of the clients' data
(experiments/multitask_reference.py reference(), shared by every run with the same data,
seeds and budget). Per point: Task Arithmetic's loss against the individual models and
against the multi-task model, and every method's difference to Task Arithmetic, paired t
intervals over replicates, Holm-adjusted within the point. Across runs: which measured
quantity predicts TA's loss (fl_merge.stats.predictors: held-out R^2 leaving one point out,
a bootstrap CI over points, Kendall's tau over point means).

Writes docs/dose_response.csv (point x model), docs/dose_response_predictors.csv,
docs/dose_response_effects.csv (each dose against its series' first), docs/dose_response_cost.csv (per run: where the time went), docs/dose_response_<series>.png,
docs/dose_response_predictors.png and docs/dose_response.md (the tables); runs and
references under --out. Finished runs and references are reused (rerun: same command).

    PYTHONPATH=$PWD .venv/bin/python experiments/dose_response.py [--replicates 10]
        [--points NAME,...] [--dry-run] [--tables-only] [--out outputs/dose_response]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _dose  # noqa: E402
from _dose import Point  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WALL_FILE = "dose_wall.json"
BOUND_NOTE = (
    "Bound: not computed. The project's docs state no bound formula (docs/ has none), and the "
    "convergence bounds of one-shot FedAvg that Tao et al. 2024 build on need constants a run "
    "does not measure (smoothness, gradient-noise variance, heterogeneity bounded along the "
    "whole training path; run.json has G^2 and B^2 at theta0 only). No proxy is substituted. "
    "How well each MEASURED quantity orders the points is its Kendall tau in the predictors table.")


@dataclass(frozen=True)
class Planned:
    point: Point
    replicate: int
    seed: int
    run_dir: Path
    overrides: dict[str, object]
    mt_key: str
    mt_overrides: dict[str, object]
    mt_steps: int
    mt_lr: float

    def done(self) -> bool:
        return (self.run_dir / "results.csv").exists() and (self.run_dir / "run.json").exists()


def plan(points: Sequence[Point], replicates: int, out: Path) -> list[Planned]:
    """Every (replicate, point) run, each replicate's points before the next replicate's (a
    partial run still spans the points)."""
    runs = []
    for r, seed in enumerate(_dose.replicate_seeds(replicates)):
        for p in points:
            o = _dose.run_overrides(p, r)
            key, mt, steps, lr = _dose.multitask_key(o)
            runs.append(Planned(p, r, seed, out / p.name / f"seed-{seed}", o, key, mt, steps, lr))
    return runs


def mt_file(out: Path, key: str) -> Path:
    return out / "multitask" / key / "reference.json"


def read_costs(runs: Sequence[Planned], out: Path) -> list[dict[str, Any]]:
    """The cost of every finished run (_dose.run_cost); each reference's seconds go to the
    first run (in plan order) that uses it."""
    seen: set[str] = set()
    costs = []
    for p in runs:
        if not p.done():
            continue
        wall_path = p.run_dir / WALL_FILE
        wall = float(json.loads(wall_path.read_text())["wall"]) if wall_path.exists() else math.nan
        mt = 0.0
        if p.mt_key not in seen and mt_file(out, p.mt_key).exists():
            mt = float(json.loads(mt_file(out, p.mt_key).read_text())["seconds"]["total"])
            seen.add(p.mt_key)
        costs.append(_dose.run_cost(p.run_dir, p.point.name, p.seed, wall, mt))
    return costs


def dry_run(runs: Sequence[Planned], out: Path) -> str:
    """The planned runs (done or to run), the distinct multi-task references and the time the
    rest should take (_dose.estimate_seconds)."""
    lines = []
    for p in runs:
        extra = {k: v for k, v in p.overrides.items() if k not in _dose.COMMON}
        status = "[done]  " if p.done() else "[to run]"
        lines.append(f"{status} {p.point.name:<12} replicate {p.replicate:>2} "
                     + " ".join(f"{k}={v}" for k, v in extra.items()) + f"  (multitask {p.mt_key})")
    keys = list(dict.fromkeys(p.mt_key for p in runs))
    mt_todo = [k for k in keys if not mt_file(out, k).exists()]
    todo = [p for p in runs if not p.done()]
    est = _dose.estimate_seconds([p.point.name for p in todo], len(mt_todo), read_costs(runs, out))
    basis = (f"medians of {int(est['measured'])} timed runs, per point where timed"
             if est["measured"] else
             f"prior {_dose.PRIOR_RUN_SECONDS:.0f} s per run, "
             f"{_dose.PRIOR_MULTITASK_SECONDS:.0f} s per reference")
    lines.append(f"planned: {len(runs)} runs ({len(runs) - len(todo)} done, {len(todo)} to run), "
                 f"{len(keys)} multi-task references ({len(keys) - len(mt_todo)} done, "
                 f"{len(mt_todo)} to compute)")
    lines.append(f"estimate: {est['total'] / 3600:.1f} h = {len(todo)} runs x {est['per_run']:.0f} s + "
                 f"{len(mt_todo)} x {est['per_multitask']:.0f} s ({basis}; 2-core machine, "
                 f"runs one at a time)")
    return "\n".join(lines)


def execute(runs: Sequence[Planned], out: Path) -> list[str]:
    """Run what is missing: each run (timed here, Ray start-up included) and then its
    multi-task reference unless one with its key exists. A run or reference that fails is
    named (and in out/failures.txt) and the next one goes on: an unattended experiment of
    hours does not stop at one bad point; the tables count it as missing."""
    from _runner import run_point
    from multitask_reference import reference, write_reference

    failures = []
    for i, p in enumerate(runs):
        print(f"== {i + 1}/{len(runs)}: {p.point.name} replicate {p.replicate} (seed {p.seed})", flush=True)
        try:
            if not p.done():
                t0 = time.perf_counter()
                run_point(p.run_dir, p.overrides)
                (p.run_dir / WALL_FILE).write_text(json.dumps({"wall": time.perf_counter() - t0}))
            path = mt_file(out, p.mt_key)
            if not path.exists():
                res = reference(p.mt_overrides, p.mt_steps, p.mt_lr)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_reference(res, path.with_suffix(".csv"))
                given = {k: str(v) for k, v in p.mt_overrides.items()}
                path.write_text(json.dumps({**res, "overrides": given}, indent=1, default=str))
                print(f"multi-task reference {p.mt_key}: {res['rows'][-1]['multitask-test-accuracy']:.4f} "
                      f"in {res['seconds']['total']:.0f} s", flush=True)
        except (SystemExit, Exception) as e:  # run_point raises SystemExit for a failed run
            failures.append(f"{p.point.name} seed {p.seed}: {e}")
            print(f"FAILED {failures[-1]}", flush=True)
    if failures:
        out.mkdir(parents=True, exist_ok=True)
        (out / "failures.txt").write_text("\n".join(failures) + "\n")
    return failures


def collect(runs: Sequence[Planned], out: Path) -> tuple[list[dict[str, Any]], int]:
    """(points of every finished run with its reference, how many planned runs lack one)."""
    points, missing = [], 0
    for p in runs:
        path = mt_file(out, p.mt_key)
        if not (p.done() and path.exists()):
            missing += 1
            continue
        points.append(_dose.read_dose_point(p.run_dir, p.point.name, p.seed, json.loads(path.read_text())))
    return points, missing


def predictor_tables(points: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Per target (loss_individual = individual - TA, loss_multitask = multitask - TA, per
    run), every measure ranked by fl_merge.stats.predictors.rank_predictors over all runs,
    grouped by point."""
    from fl_merge.stats.predictors import rank_predictors

    names = sorted({m for p in points for m in p["measures"]})
    groups = [p["setting"] for p in points]
    measures = {m: [float(p["measures"].get(m, math.nan)) for p in points] for m in names}
    tables = {}
    for ref in ("individual", "multitask"):
        y = [float(p["acc"][ref]) - float(p["acc"][_dose.REFERENCE]) for p in points]
        tables[f"loss_{ref}"] = rank_predictors(measures, y, groups, seed=seed)
    return tables


def report(points: Sequence[dict[str, Any]], costs: Sequence[dict[str, Any]], docs: Path, replicates: int,
           missing: int) -> str:
    """Tabulate, write the docs files and figures, return the Markdown (also docs/dose_response.md)."""
    from _dose_plots import (RESULTS_CAPTION, cost_markdown, effects_markdown, plot_predictors,
                             plot_series, predictors_markdown, results_markdown, slug)
    from _points import tabulate

    from fl_merge.io.results import write_rows

    docs.mkdir(parents=True, exist_ok=True)
    order = [p.name for p in _dose.POINTS]
    rows = _dose.point_families(tabulate(sorted(points, key=lambda p: order.index(p["setting"])),
                                         _dose.REFERENCE))
    for r in rows:  # which series the point belongs to, and its dose there
        r["series"] = "; ".join(f"{s}: {label}" for s, doses in _dose.SERIES.items()
                                for p, label in doses if p == r["setting"])
    write_rows(docs / "dose_response.csv", rows)
    effects = _dose.dose_effects(points) + _dose.dose_effects(points, "gap")
    write_rows(docs / "dose_response_effects.csv", effects)
    tables = predictor_tables(points)
    write_rows(docs / "dose_response_predictors.csv",
               [{"target": t, **r} for t, rs in tables.items() for r in rs])
    write_rows(docs / "dose_response_cost.csv", costs)
    for series, doses in _dose.SERIES.items():
        plot_series(rows, series, doses, _dose.METHODS, docs / f"dose_response_{slug(series)}.png",
                    replicates)
    plot_predictors(tables, docs / "dose_response_predictors.png")
    total = sum(float(c["wall"]) if not math.isnan(float(c["wall"])) else float(c["total"]) for c in costs)
    total += sum(float(c["multitask"]) for c in costs)
    head = (f"{len(points)} runs with their multi-task reference ({missing} planned runs missing), "
            f"{len({p['setting'] for p in points})} points, {replicates} replicates planned; "
            f"{total / 3600:.2f} h of run time in all (wall per run where timed here, else run.json "
            f"total-seconds; plus the references).")
    md = "\n\n".join([head, results_markdown(rows, ["mean_cosine", "b_dissimilarity", "steps_cv", "lr_cv"]),
                      RESULTS_CAPTION,
                      "The dose-response of Task Arithmetic: its test accuracy, then its one-shot FL gap "
                      "(multi-task - TA), at each dose minus at the series' first dose, paired by "
                      "replicate (points; the accuracies of different task sets are not comparable, "
                      "their gaps are):",
                      effects_markdown(effects),
                      "`*` = Holm-adjusted p < 0.05 over the series' doses (one family per series; "
                      "paired t test over replicates); intervals are unadjusted 95% paired t intervals.",
                      "Which measured quantity predicts Task Arithmetic's loss, across runs:",
                      predictors_markdown(tables), BOUND_NOTE, "Where the time went (seconds):",
                      cost_markdown(costs)])
    (docs / "dose_response.md").write_text(md + "\n")
    return md


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicates", type=int, default=10, help="replicates per point (seeds 10, 11, ...)")
    ap.add_argument("--points", default="", help="comma list of point or series names (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="print the planned runs and an estimated time")
    ap.add_argument("--tables-only", action="store_true", help="tabulate the finished runs, run nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "dose_response")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    a = ap.parse_args(argv)
    try:
        runs = plan(_dose.select_points(a.points), a.replicates, a.out.resolve())
    except ValueError as e:
        ap.error(str(e))
    if a.dry_run:
        print(dry_run(runs, a.out.resolve()))
        return
    failures = [] if a.tables_only else execute(runs, a.out.resolve())
    points, missing = collect(runs, a.out.resolve())
    if not points:
        raise SystemExit("no finished run to tabulate (run without --tables-only first)")
    print(report(points, read_costs(runs, a.out.resolve()), a.docs, a.replicates, missing))
    if failures:
        print(f"{len(failures)} failed (out/failures.txt): " + "; ".join(failures))


if __name__ == "__main__":
    main()
