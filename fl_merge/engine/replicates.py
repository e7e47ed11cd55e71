"""Replicates: one config run once per seed, then an over-seed table with 95% CIs.

    fl-merge-run --seeds 0,1,2 --run-config 'num-clients=2 method="task_arithmetic,ties"'
    python -m fl_merge.engine.replicates --seeds 0,1,2 [--data-seeds] [--out DIR]
        -- num-clients=2 method=task_arithmetic,ties
    python -m fl_merge.engine.replicates --table RUN_DIR RUN_DIR ...   (runs already made)

Each replicate is the same run config with only `seed` changed (the root of its clients'
training seeds: with client-seeds=spawn, the default, no two clients of any replicates share
a seed, fl_merge/core/seeds.py; with --data-seeds `data-seed` too), written to
<out>/seed-<s>/. The table (replicates.csv, replicates.png in <out>) has, per method (and
the base), the mean over seeds of its mean-over-tasks test accuracy at the eta chosen on
validation with a 95% t interval, and the paired per-seed difference against Task
Arithmetic (else fedavg) with its t interval, marked where its Holm-adjusted paired-t
p-value over the table's comparisons is below 0.05 (fl_merge.stats.multiplicity).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_merge.io.results import RESULTS_FILE, RUN_FILE, mean, read_rows, write_rows
from fl_merge.round.tables import reference_label
from fl_merge.stats.intervals import ci_line, over_seed_table, seed_marks
from fl_merge.stats.multiplicity import CORRECTIONS, NAMES, caption

if TYPE_CHECKING:
    from fl_merge.config.run_config import ResolvedConfig

TABLE_FILE = "replicates.csv"
PLOT_FILE = "replicates.png"
# Run-config keys that may differ between replicates of one config (the docstring above: seeds
# are the client training seeds, with --data-seeds the data seeds too).
PER_REPLICATE = ("seed", "output-dir", "data-seed")
REFERENCE_MODELS = ("ensemble", "single")  # results.csv `model` of ensemble=true's reference rows


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; ValueError naming the problem (not integers, repeated, empty)."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"seeds must be comma-separated integers like '0,1,2', got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers like '0,1,2', got '{text}'")
    return seeds


def replicate_configs(overrides: Mapping[str, Any], seeds: Sequence[int], root: Path,
                      data_seeds: bool = False) -> list[dict[str, Any]]:
    """One Flower run config (dashed keys) per seed: `overrides` with seed = s and output-dir =
    root/seed-<s> (with `data_seeds` also data-seed = s), nothing else changed. ValueError
    when `overrides` set those keys themselves (the replicates set them) or `seeds` repeat."""
    mine = PER_REPLICATE if data_seeds else PER_REPLICATE[:2]
    clash = [k for k in mine if k in overrides or k.replace("-", "_") in overrides]
    if clash:
        raise ValueError(f"{', '.join(clash)} is set per replicate (seeds -> seed, --out -> "
                         f"<out>/seed-<s>): drop it from the run-config overrides")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"replicates need distinct seeds, got {list(seeds)}")
    return [{**overrides, "seed": int(s), **({"data-seed": int(s)} if data_seeds else {}),
             "output-dir": str(Path(root) / f"seed-{int(s)}")} for s in seeds]


def run_accuracies(run_dir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """(run.json, model -> mean over tasks of test accuracy) of one run: each method at its
    chosen eta (the `selected` merged test rows), the reference models of `ensemble=true`
    ("ensemble", "best-single") when the run has them, and "base" (eta 0) from the first
    method."""
    run = json.loads((Path(run_dir) / RUN_FILE).read_text())
    rows = [r for r in read_rows(Path(run_dir) / RESULTS_FILE) if r["split"] == "test"]
    out: dict[str, float] = {}
    for label in run["methods"]:
        out[label] = mean([r["accuracy"] for r in rows if r["method"] == label
                           and r["model"] == "merged" and r["selected"] is True])
    for label in sorted({r["method"] for r in rows if r["model"] in REFERENCE_MODELS}):
        out[label] = mean([r["accuracy"] for r in rows if r["method"] == label and r["selected"] is True])
    first = next(iter(run["methods"]), None)
    out["base"] = mean([r["accuracy"] for r in rows if r["method"] == first and r["model"] == "base"])
    return run, out


def _same_config(runs: Sequence[tuple[Path, Mapping[str, Any]]]) -> None:
    """ValueError naming the keys where runs differ beyond seed and output-dir."""
    def fixed(run: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in run.get("config", {}).items() if k not in PER_REPLICATE}

    first_dir, first = runs[0]
    for d, run in runs[1:]:
        a, b = fixed(first), fixed(run)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ValueError(f"{d} is not a replicate of {first_dir}: run config differs in "
                             f"{', '.join(diff)} (only seed may differ)")
        if list(run["methods"]) != list(first["methods"]):
            raise ValueError(f"{d} ran methods {list(run['methods'])}, {first_dir} {list(first['methods'])}")


def replicate_table(run_dirs: Sequence[Path], correction: str = "holm") -> list[dict[str, Any]]:
    """Over-seed table of runs of one config differing only in seed: per method (then base),
    the per-seed accuracies, their mean with a 95% t interval (NaN bounds for one seed), and
    the paired per-seed difference against Task Arithmetic/fedavg with its t interval, whether
    it excludes 0 and its raw and Holm-adjusted p (`over_seed_table`); `within_seed_marked`
    'k/n': in k of the n runs the within-run paired bootstrap over test examples excluded 0 (a
    raw, uncorrected count that marks nothing). ValueError when the runs are not
    replicates of one config."""
    if not run_dirs:
        raise ValueError("replicate_table needs at least one run directory")
    loaded = [(Path(d), *run_accuracies(Path(d))) for d in run_dirs]
    _same_config([(d, run) for d, run, _ in loaded])
    seeds = [run.get("config", {}).get("seed") for _, run, _ in loaded]
    methods = {label: (m["name"], m.get("params", {})) for label, m in loaded[0][1]["methods"].items()}
    ref = reference_label(methods)
    references = [m for m in loaded[0][2] if m not in methods and m != "base"]
    models = [*methods, *references, "base"]
    stats = over_seed_table({model: [acc.get(model, math.nan) for _, _, acc in loaded]
                             for model in models}, ref, correction)
    rows = []
    for model in models:
        values = [acc.get(model, math.nan) for _, _, acc in loaded]
        name = methods[model][0] if model in methods else model.replace("-", "_")
        row: dict[str, Any] = {"model": model, "method_name": name,
                               "n_seeds": len(values), "seeds": ";".join(str(s) for s in seeds),
                               "per_seed": ";".join(f"{v:.6g}" for v in values), **stats[model]}
        if ref is not None:
            row["within_seed_marked"] = _within_seed_marks(model, ref, [run for _, run, _ in loaded])
        rows.append(row)
    return rows


def _within_seed_marks(model: str, ref: str, runs: Sequence[Mapping[str, Any]]) -> str:
    """'k/n': in how many of the n runs the within-run paired bootstrap CI of (model - ref)
    excluded 0 (run.json `comparison`); '' when a run has no such comparison."""
    marks = []
    for run in runs:
        got = [c for c in run.get("comparison", [])
               if c.get("model") == model and c.get("reference") == ref]
        marks.append(bool(got[0].get("excludes_zero")) if got else None)
    return seed_marks(marks)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The over-seed table as text, `*` where the difference is significant after the
    table's multiple-comparison correction (`over_seed_table`), and a caption naming it."""
    if not rows:
        return ""
    ref = rows[0].get("reference")
    lines = [f"test accuracy over {rows[0]['n_seeds']} seeds ({rows[0]['seeds']}): mean [95% t CI]"
             + (f"; paired difference vs {ref} [95% t CI, unadjusted]" if ref else "")]
    if ref and rows[0]["n_seeds"] > 1:
        family = sum(1 for r in rows if r.get("p_adjusted") == r.get("p_adjusted"))
        lines.append(caption(rows[0].get("correction", "holm"), family, ref))
    for r in rows:
        diff = (r["diff"], r["diff_low"], r["diff_high"], bool(r.get("significant"))) if ref else None
        line = ci_line(r["model"], 24, r["mean"], r["ci_low"], r["ci_high"], diff)
        if ref and r.get("within_seed_marked"):
            line += f"   within-seed CI excludes 0 in {r['within_seed_marked']} seeds"
        lines.append(line)
    if rows[0]["n_seeds"] == 1:
        lines.append("(one seed: the spread over seeds is unknown, so the intervals are nan "
                     "and no difference is marked)")
    return "\n".join(lines)


def plot_table(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """replicates.png: per model the mean with its CI as error bars; beside it the paired
    difference vs the reference with its CI, `*` above those `significant` after the table's
    multiple-comparison correction (Holm by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = rows[0].get("reference")
    fig, axes = plt.subplots(1, 2 if ref else 1, figsize=(11 if ref else 6, 4), squeeze=False)
    names = [r["model"] for r in rows]
    xs = range(len(rows))

    def bars(ax: Any, key: str, lo: str, hi: str) -> None:
        vals = [r[key] for r in rows]
        err = [[max(0.0, v - r[lo]) if r[lo] == r[lo] else 0.0 for v, r in zip(vals, rows)],
               [max(0.0, r[hi] - v) if r[hi] == r[hi] else 0.0 for v, r in zip(vals, rows)]]
        ax.errorbar(xs, vals, yerr=err, fmt="o", capsize=4)
        ax.set_xticks(list(xs), names, rotation=30, ha="right")

    bars(axes[0][0], "mean", "ci_low", "ci_high")
    axes[0][0].set_ylabel("mean test accuracy over tasks")
    axes[0][0].set_title(f"{rows[0]['n_seeds']} seeds: mean, 95% t CI")
    if ref:
        ax = axes[0][1]
        bars(ax, "diff", "diff_low", "diff_high")
        ax.axhline(0.0, color="grey", lw=0.8)
        for x, r in zip(xs, rows):
            if r.get("significant"):
                ax.annotate("*", (x, r["diff_high"]), ha="center", va="bottom", fontsize=14, color="red")
        ax.set_ylabel(f"accuracy - {ref} (paired by seed)")
        ax.set_title(f"difference vs reference (* {NAMES[rows[0].get('correction', 'holm')]}"
                     "-adjusted p < 0.05)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_replicates(run_dirs: Sequence[Path], out: Path, correction: str = "holm") -> list[dict[str, Any]]:
    """replicates.csv and replicates.png under `out` from `replicate_table(run_dirs,
    correction)` (fl_merge.stats.multiplicity: holm, bh or none)."""
    rows = replicate_table(run_dirs, correction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / TABLE_FILE, rows)
    plot_table(rows, out / PLOT_FILE)
    return rows


def run_once(cfg: ResolvedConfig, engine: str = "simulation") -> Path:
    """One replicate through the one run path (`fl_merge.engine.run.run`, which takes the
    resolved config as it is); its output directory."""
    from fl_merge.engine.run import run

    return run(cfg, engine=engine).out_dir


def run_replicates(overrides: Mapping[str, Any], seeds: Sequence[int], out: Path,
                   run: Callable[[ResolvedConfig], Path] = run_once, data_seeds: bool = False,
                   correction: str = "holm") -> list[dict[str, Any]]:
    """Run the config once per seed (`run`: one resolved config -> its output dir), then write
    the over-seed table under `out`. Every config is resolved (checked) once, before the first
    run starts."""
    configs = replicate_configs(overrides, seeds, out, data_seeds)
    from fl_merge.config.run_config import RunConfig

    resolved = [RunConfig.from_flower(c).resolve() for c in configs]  # ConfigError before any training
    dirs = [run(cfg) for cfg in resolved]
    return write_replicates(dirs, out, correction)


def _overrides(pairs: Sequence[str]) -> dict[str, str]:
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ValueError(f"run-config overrides must be key=value (e.g. num-clients=2), got {bad}")
    return dict(p.split("=", 1) for p in pairs)


def main(argv: Sequence[str] | None = None,
         run: Callable[[ResolvedConfig], Path] = run_once) -> int:
    p = argparse.ArgumentParser(prog="python -m fl_merge.engine.replicates", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--out", help="where seed-<s>/ and the table go (default outputs/replicates-<time>)")
    p.add_argument("--data-seeds", action="store_true", help="each replicate also sets data-seed to its seed")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR", help="only build the table from these runs")
    p.add_argument("--correction", default="holm", choices=sorted(CORRECTIONS),
                   help="multiple-comparison correction of the marks (default holm; bh: Benjamini-Hochberg)")
    p.add_argument("overrides", nargs="*", help="run-config overrides key=value (after --)")
    a = p.parse_args(argv)
    try:
        if a.table:
            out = Path(a.out) if a.out else Path(a.table[0]).parent
            rows = write_replicates([Path(d) for d in a.table], out, a.correction)
        else:
            if not a.seeds:
                raise ValueError("give --seeds (e.g. --seeds 0,1,2) or --table RUN_DIR ...")
            out = Path(a.out or f"outputs/replicates-{datetime.now():%Y%m%d-%H%M%S}").resolve()
            rows = run_replicates(_overrides(a.overrides), parse_seeds(a.seeds), out, run, a.data_seeds,
                                  a.correction)
    except ValueError as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"wrote {out / TABLE_FILE} and {out / PLOT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
