"""The dose-response design (experiments/dose_response.py): its points, the run config of each
replicate, where the multi-task reference of a run is shared, and how a finished run is read
into a point (experiments/_points.py) and into where its time went.

Points. Each is one run configuration; its replicates differ only in their seeds. Replicate
r (0-based) uses seed = data-seed = SEED0 + r with client-seeds=spawn (fl_merge/core/seeds.py):
the clients' training streams and the data split/partition vary together from replicate to
replicate and no two replicates or clients share a seed. SEED0 = 10: the design seeds 1000
and 1001 that chose headroom-v2 (docs/headroom.md) are never used. The new defaults are named
explicitly (client-seeds=spawn, partition-probe=heldout), since experiments/_runner.py
otherwise pins the old scheme.

* label skew: rotate90 split across the K=4 clients, iid then Dirichlet(alpha) over labels for
  alpha 10, 1, 0.3, 0.1, 0.03;
* task dissimilarity: one task per client, mnist-near, mnist-mid and headroom-v2 as "far".
  headroom-v2 rather than mnist-far: it is mnist-far with noise in place of digits8x8
  (docs/headroom.md: digits8x8 has little to gain and ends below its base in every 4-task
  merge, so mnist-far's loss is mostly that one task), it is the suite the training points
  use, and so its runs serve three series at once;
* training heterogeneity on headroom-v2 at equal ARITHMETIC mean: local steps 150 for all,
  then 100,150,150,200 and 50,150,150,250 (mean 150); lr 0.01 for all, then
  0.006,0.01,0.01,0.014 and 0.002,0.01,0.01,0.018 (mean 0.01). Two clients keep the mean
  value and two move apart symmetrically: the two that keep it train exactly the updates of
  the headroom-v2 point's run of the same replicate (same task, seed, steps and lr), so they
  come from the client-update cache (half the clients of these 4 points never train), and
  each spread is paired with the reference point through them. Arithmetic, not geometric:
  to first order a task vector is -lr_i * sum of its s_i gradient steps, so with equal client
  gradients Task Arithmetic's sum of task vectors is the same at every spread with the same
  sum of lr_i s_i (and the same total compute, so the multi-task reference is the same
  model): what changes is only who moved how far. Which client gets which value rotates with
  the replicate (replicate r shifts the list left by r mod K), so no task is always the
  long-trained one.

Methods: Task Arithmetic (the reference) and TIES, TSV-M and RegMean, each tuned on
validation in its own units (search=paper) with the two-stage prescreen (0.25, 3 finalists);
all four merge the same client updates in one run. EMR is left out: it deploys K models, one
per task, not the one model one-shot FL delivers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

K = 4
METHODS = ("task_arithmetic", "ties", "tsv_m", "regmean")
REFERENCE = "task_arithmetic"
LAMBDAS = "0.05,0.1,0.2,0.3,0.5,0.7,1,1.5,2,3"
SEED0 = 10
DESIGN_SEEDS = (1000, 1001)  # chose headroom-v2; never reported
SPLIT_TASK = "rotate90"
SUITE = "headroom-v2"
COMMON: dict[str, object] = {
    "num-clients": K, "method": ",".join(METHODS), "search": "paper", "lambdas": LAMBDAS,
    "prescreen": 0.25, "finalists": 3, "client-seeds": "spawn", "partition-probe": "heldout"}
# keys that only the run (its training values and merge search) reads, not the multi-task reference
RUN_ONLY = ("method", "method-params", "search", "lambdas", "prescreen", "finalists", "local-steps", "lr")
# The extra models every point tabulates beside the methods, each against Task Arithmetic:
# diff = model - TA, so "individual"'s diff is TA's loss against the individual models and
# "multitask"'s the one-shot FL gap.
REFERENCES = ("base", "individual", "multitask")
# run.json `heterogeneity` keys read as candidate predictors; lr_cv is computed from the clients' lrs
MEASURES = ("mean_cosine", "min_cosine", "sign_agreement", "unanimous_fraction", "b_dissimilarity",
            "grad_diversity", "norm_cv", "norm_mean", "steps_cv", "lr_steps_cv")
# Before any run is timed (dose_response.py --dry-run), on the 2-core machine. A run: the
# closest measured runs are docs/dissimilarity.md's (K=4, 150 steps, 72 validation candidates
# without prescreen): 303 s each beside other jobs; here 80 candidates with prescreen 0.25
# (32 whole-split passes instead of 72; headroom.md measured the prescreen at about half the
# run time where scoring dominates) -> about 240 s. A multi-task reference: 13 s measured
# (experiments/multitask_reference.py, headroom-v2 and Dirichlet 0.03 at 150 joint steps,
# beside a text run) -> 20 s.
PRIOR_RUN_SECONDS = 240.0
PRIOR_MULTITASK_SECONDS = 20.0


@dataclass(frozen=True)
class Point:
    name: str
    overrides: Mapping[str, object]  # on top of COMMON
    spread: Mapping[str, Sequence[float]] = field(default_factory=dict)  # per-client lists, rotated


def _split(alpha: float | None) -> Point:
    if alpha is None:
        return Point("skew-iid", {"data": "iid", "partition-task": SPLIT_TASK})
    return Point(f"skew-a{alpha:g}", {"data": "dirichlet", "alpha": alpha, "partition-task": SPLIT_TASK})


STEPS = {"steps-mild": (100, 150, 150, 200), "steps-wide": (50, 150, 150, 250)}
LRS = {"lr-mild": (0.006, 0.01, 0.01, 0.014), "lr-wide": (0.002, 0.01, 0.01, 0.018)}
POINTS: tuple[Point, ...] = (
    _split(None), *(_split(a) for a in (10.0, 1.0, 0.3, 0.1, 0.03)),
    Point("tasks-near", {"data": "tasks", "suite": "mnist-near"}),
    Point("tasks-mid", {"data": "tasks", "suite": "mnist-mid"}),
    Point(SUITE, {"data": "tasks", "suite": SUITE}),
    *(Point(n, {"data": "tasks", "suite": SUITE}, {"local-steps": v}) for n, v in STEPS.items()),
    *(Point(n, {"data": "tasks", "suite": SUITE}, {"lr": v}) for n, v in LRS.items()),
)
BY_NAME = {p.name: p for p in POINTS}
# series -> its points in order of increasing heterogeneity, each with its dose label
SERIES: dict[str, list[tuple[str, str]]] = {
    "label skew (rotate90 split)": [("skew-iid", "iid"), *((f"skew-a{a:g}", f"alpha {a:g}")
                                                             for a in (10, 1, 0.3, 0.1, 0.03))],
    "task dissimilarity": [("tasks-near", "mnist-near"), ("tasks-mid", "mnist-mid"),
                           (SUITE, "far: headroom-v2")],
    "local-steps spread (mean 150)": [(SUITE, "150 x4"),
                                      *((n, ",".join(map(str, v))) for n, v in STEPS.items())],
    "lr spread (mean 0.01)": [(SUITE, "0.01 x4"), *((n, ",".join(map(str, v))) for n, v in LRS.items())],
}


def replicate_seeds(n: int) -> list[int]:
    """The seeds of replicates 0..n-1: SEED0 + r, never a design seed."""
    if n < 1:
        raise ValueError(f"--replicates must be at least 1, got {n}")
    seeds = [SEED0 + r for r in range(n)]
    if set(seeds) & set(DESIGN_SEEDS):
        raise ValueError(f"{n} replicates would reach the design seeds {DESIGN_SEEDS}; use fewer")
    return seeds


def select_points(spec: str) -> list[Point]:
    """The points named in a comma list of point or series names ('' = all), in design
    order; ValueError naming the known ones."""
    if not spec.strip():
        return list(POINTS)
    wanted: set[str] = set()
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name in BY_NAME:
            wanted.add(name)
        elif name in SERIES:
            wanted.update(p for p, _ in SERIES[name])
        else:
            raise ValueError(f"unknown point or series '{name}'; points: {', '.join(BY_NAME)}; "
                             f"series: {', '.join(SERIES)}")
    return [p for p in POINTS if p.name in wanted]


def rotated(values: Sequence[float], r: int) -> list[float]:
    s = r % len(values)
    return list(values[s:]) + list(values[:s])


def run_overrides(point: Point, replicate: int) -> dict[str, object]:
    """Replicate `replicate`'s run-config overrides of `point` (no output-dir)."""
    seed = SEED0 + replicate
    spread = {k: ",".join(f"{v:g}" for v in rotated(vals, replicate)) for k, vals in point.spread.items()}
    return {**COMMON, **point.overrides, **spread, "seed": seed, "data-seed": seed}


def multitask_budget(overrides: Mapping[str, object]) -> tuple[int, float]:
    """(joint steps, lr) of a run's multi-task reference: round(mean local steps) and the mean
    lr (fl_merge.models.multitask.default_multitask_steps; experiments/multitask_reference.py),
    the lr rounded to 12 digits so equal means give one reference."""
    from fl_merge.config.run_config import RunConfig
    from fl_merge.models.multitask import default_multitask_steps

    resolved = RunConfig.from_flower(dict(overrides)).resolve()
    return default_multitask_steps(resolved.local_steps), round(sum(resolved.lrs) / len(resolved.lrs), 12)


def multitask_key(overrides: Mapping[str, object]) -> tuple[str, dict[str, object], int, float]:
    """(key, reference overrides, steps, lr): what the multi-task reference of a run reads
    (its data, model, seeds; not the run's merge search or per-client training values) and
    its budget. Runs with equal keys share one reference (e.g. every spread point of a
    replicate: same data, same seeds, same mean steps and lr)."""
    steps, lr = multitask_budget(overrides)
    mt = {k: v for k, v in overrides.items() if k not in RUN_ONLY and k != "output-dir"}
    text = json.dumps({**{k: str(v) for k, v in mt.items()}, "mt-steps": steps, "mt-lr": lr}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12], mt, steps, lr


def read_dose_point(run_dir: Path, point: str, seed: int, multitask: Mapping[str, Any]) -> dict[str, Any]:
    """One run as a point of experiments/_points.py: accuracies of every method (at its
    validation choice) and the base, plus "individual" (the mean over clients of each
    client's own fine-tuned model on its test split: the run's finetuned rows) and
    "multitask" (`multitask`: experiments/multitask_reference.reference's result, its mean
    row); the MEASURES of run.json and lr_cv (the CV of the clients' lrs)."""
    from _points import read_point

    from fl_merge.io.results import RESULTS_FILE, mean, read_rows
    from fl_merge.stats.heterogeneity import spread

    p = read_point(run_dir, point, seed, MEASURES)
    run = json.loads((Path(run_dir) / "run.json").read_text())
    first = next(iter(run["methods"]))
    ft = [r["accuracy"] for r in read_rows(Path(run_dir) / RESULTS_FILE)
          if r["split"] == "test" and r["model"] == "finetuned" and r["method"] == first]
    if len(ft) != len(run.get("tasks", ft)):
        raise ValueError(f"{run_dir}: {len(ft)} fine-tuned test rows for {len(run.get('tasks', []))} tasks")
    p["acc"]["individual"] = mean([float(v) for v in ft])
    p["acc"]["multitask"] = float(multitask["rows"][-1]["multitask-test-accuracy"])
    lrs = [float(c["lr"]) for c in run.get("clients", []) if "lr" in c]
    if lrs:
        p["measures"]["lr_cv"] = spread(lrs)
    return p


def run_cost(run_dir: Path, point: str, seed: int, wall: float, multitask_seconds: float) -> dict[str, Any]:
    """Where one run's time went (run.json `timings` and its clients' train-seconds):
    merge = aggregate-seconds (the task vectors and every method's candidates), scoring =
    validation + test evaluation, train_and_other = the server's total-seconds minus those
    (theta0, the clients' training and replies, the heterogeneity measures, writing);
    train_client_sum = the training seconds of the clients that trained in this run, added
    up (they run side by side; a client whose update came from the cache adds 0);
    wall = the whole run_point call here (Ray start-up included; NaN for a run made
    earlier); multitask = the reference's seconds when it was computed for this run (0 when
    shared or cached)."""
    run = json.loads((Path(run_dir) / "run.json").read_text())
    t = {k: float(v) for k, v in (run.get("timings") or {}).items()}
    total = t.get("total-seconds", math.nan)
    merge = t.get("aggregate-seconds", 0.0)
    scoring = t.get("validation-evaluate-seconds", 0.0) + t.get("test-evaluate-seconds", 0.0)
    clients = run.get("clients", [])
    return {"point": point, "seed": seed, "wall": wall, "total": total,
            "train_and_other": total - merge - scoring,
            "merge": merge, "scoring": scoring,
            "train_client_sum": sum(float(c.get("train-seconds", 0.0)) for c in clients
                                    if not int(c.get("cached", 0))),
            "cached_clients": sum(int(c.get("cached", 0)) for c in clients), "clients": len(clients),
            "multitask": multitask_seconds}


def point_families(rows: Sequence[dict[str, Any]], correction: str = "holm") -> list[dict[str, Any]]:
    """Adjust the tabulated rows' raw p-values per POINT: the methods' differences to Task
    Arithmetic at a point are one family, its REFERENCES (base, individual, multitask)
    another. Sets p_adjusted, correction, significant (< 0.05) and family on every row, in
    place; the reference row and rows without a p get NaN and no mark. Also `mdd`: the
    smallest true difference to Task Arithmetic the row's paired t test over its n
    replicates would detect with 80% power at Holm's strictest level, 0.05 / (family size),
    with the standard deviation of its differences as measured (recovered from its t
    interval; fl_merge.stats.intervals.minimum_detectable_difference)."""
    from scipy import stats as sps

    from fl_merge.stats.intervals import minimum_detectable_difference
    from fl_merge.stats.multiplicity import ALPHA, adjust

    fams: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["model"] != r["reference"] and not math.isnan(float(r.get("p_value", math.nan))):
            kind = "references" if r["model"] in REFERENCES else "methods"
            fams.setdefault((str(r["setting"]), kind), []).append(r)
        r.update(p_adjusted=math.nan, correction=correction, significant=False, family="", mdd=math.nan)
    for (setting, kind), fam in fams.items():
        for r, q in zip(fam, adjust([float(r["p_value"]) for r in fam], correction)):
            n = int(r["n_seeds"])
            sd = (float(r["diff_high"]) - float(r["diff_low"])) / 2 / sps.t.ppf(0.975, n - 1) * math.sqrt(n)
            r.update(p_adjusted=q, significant=bool(q < ALPHA),
                     family=f"{correction} over {len(fam)} {kind} vs {r['reference']} at {setting}",
                     mdd=minimum_detectable_difference(sd, n, ALPHA / len(fam)))
    return list(rows)


def estimate_seconds(todo: Sequence[str], planned_multitask: int,
                     costs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The seconds of the runs still to do (`todo`: their points' names) and of the references
    still to compute, from per-run estimates: a run costs the median wall (else total) of its
    point's runs timed so far, else of all timed runs, else PRIOR_RUN_SECONDS (a spread point,
    half of whose clients come from the cache, is cheaper than a fresh one once one of its
    runs is timed); a reference the median of those computed, else PRIOR_MULTITASK_SECONDS.
    Returns the total, the mean per run, the per-reference seconds and how many runs were
    timed."""
    import statistics

    def seconds(c: Mapping[str, Any]) -> float:
        return float(c["wall"]) if not math.isnan(float(c["wall"])) else float(c["total"])

    timed = [(str(c["point"]), seconds(c)) for c in costs if not math.isnan(seconds(c))]
    overall = statistics.median([s for _, s in timed]) if timed else PRIOR_RUN_SECONDS
    per_point = {p: statistics.median([s for q, s in timed if q == p]) for p, _ in timed}
    runs = sum(per_point.get(p, overall) for p in todo)
    mts = [float(c["multitask"]) for c in costs if float(c.get("multitask", 0.0)) > 0]
    per_mt = statistics.median(mts) if mts else PRIOR_MULTITASK_SECONDS
    return {"total": runs + planned_multitask * per_mt, "per_run": runs / len(todo) if todo else 0.0,
            "per_multitask": per_mt, "measured": float(len(timed))}


def dose_effects(points: Sequence[Mapping[str, Any]], quantity: str = "accuracy", model: str = REFERENCE,
                 correction: str = "holm") -> list[dict[str, Any]]:
    """The dose-response itself: per SERIES, a quantity at each dose minus at the series' first
    (least heterogeneous) dose, paired by replicate seed (the same seeds and, for the spread
    points, the same two mean-keeping clients), in points: mean, paired t interval, raw p
    (one-sample t test of the differences) and the p adjusted over the series' doses (one
    family per series). Only seeds with both points count (`n`). quantity "accuracy":
    `model`'s test accuracy (comparable across doses where the tasks are the same: the skew
    and spread series); "gap": the one-shot FL gap, multitask - `model` (each task set
    against its own multi-task model, so comparable across task sets too)."""
    if quantity not in ("accuracy", "gap"):
        raise ValueError(f"quantity must be accuracy or gap, got {quantity!r}")
    from fl_merge.stats.intervals import paired_t
    from fl_merge.stats.multiplicity import ALPHA, adjust, paired_p_value

    acc = {(str(p["setting"]), int(p["seed"])): 100 * (
        float(p["acc"][model]) if quantity == "accuracy" else float(p["acc"]["multitask"]) - float(p["acc"][model]))
        for p in points}
    rows: list[dict[str, Any]] = []
    for series, doses in SERIES.items():
        first, first_label = doses[0]
        fam = []
        for name, label in doses[1:]:
            seeds = sorted(s for (q, s) in acc if q == name and (first, s) in acc)
            diffs = [acc[(name, s)] - acc[(first, s)] for s in seeds]
            mean_, low, high = paired_t([acc[(name, s)] for s in seeds], [acc[(first, s)] for s in seeds])
            fam.append({"series": series, "dose": label, "point": name, "against": first_label,
                        "model": model, "quantity": quantity, "n": len(seeds), "diff": mean_, "diff_low": low,
                        "diff_high": high, "p_value": paired_p_value(diffs)})
        for r, q in zip(fam, adjust([r["p_value"] for r in fam], correction)):
            r.update(p_adjusted=q, significant=bool(q < ALPHA),
                     family=f"{correction} over the {len(fam)} doses of {series}")
        rows += fam
    return rows
