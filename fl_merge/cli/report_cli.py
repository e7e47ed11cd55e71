"""`fl-merge report DIR`: the best setting per method, chosen on validation, and plots: the
one report command (the figures themselves are drawn by `fl_merge.stats.report`).

Finds every run at any depth under DIR (`fl_merge.io.store.load_sweep`), ranks only runs of
one group (a sweep's jobs; loose runs with the same run config but for method, method
parameters and seed), and picks each method's setting on validation
(`fl_merge.stats.selection.best_settings`); the test accuracy is shown at that setting.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fl_merge.io import results, store
from fl_merge.stats import selection
from fl_merge.cli.mapping import run_config_fields
from fl_merge.cli.usage import version_line


def _plot_eta(rows: list[dict[str, Any]], best: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fl_merge.stats.report import _atomic_savefig

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, b in enumerate(best):
        color = f"C{i % 10}"
        label = b["method"] if b["setting"] == "(all runs)" else f"{b['method']}: {b['setting']}"
        curves = [selection.eta_curve(rows, b["group"], b["method"], b["setting"], split)
                  for split in ("val", "test")]
        lines = []
        for curve, style in zip(curves, ({"marker": "o", "label": label[:70]},
                                         {"ls": "--", "marker": ".", "alpha": 0.6})):
            (line,) = ax.plot([e for e, _ in curve], [a for _, a in curve], color=color, **style)
            # Test is usually scored only at the base and the chosen eta: two points say
            # nothing about the curve in between, so no line through them.
            if len(curve) <= 2:
                line.set_linestyle("none")
            lines.append(line)
        for eta in b["etas"]:
            y = dict(curves[0]).get(eta)
            if y is not None:
                ax.plot([eta], [y], marker="*", ms=14, color=color, mec="black")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("eta (server learning rate; 0 = base model)")
    ax.set_ylabel("normalized accuracy (mean over tasks, runs)")
    ax.plot([], [], color="gray", label="val")
    ax.plot([], [], color="gray", ls="--", label="test")
    ax.set_title("accuracy vs eta, each method at its best setting on val (* = eta chosen on val)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _atomic_savefig(fig, path)


def _plot_heatmap(scores: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from fl_merge.stats.report import _atomic_savefig

    methods = list(dict.fromkeys(s["method"] for s in scores))
    settings = list(dict.fromkeys(s["setting"] for s in scores))
    grid = np.full((len(methods), len(settings)), np.nan)
    for s in scores:
        grid[methods.index(s["method"]), settings.index(s["setting"])] = s["normalized_accuracy"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(settings) + 3), max(3.0, 0.5 * len(methods) + 2)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, j in itertools.product(range(len(methods)), range(len(settings))):
        if not math.isnan(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < np.nanmean(grid) else "black")
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xticks(range(len(settings)), [s if len(s) <= 40 else s[:37] + "..." for s in settings],
                  rotation=30, ha="right", fontsize=8)
    fig.colorbar(im, ax=ax, label="normalized val accuracy at chosen eta (the selection score)")
    ax.set_title("method x setting")
    return _atomic_savefig(fig, path)


def _measures(rows: list[dict[str, Any]], run_dirs: list[str]) -> list[str]:
    """het_ measures (and swept numeric run-config keys) that differ across the runs."""
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        first.setdefault(r["run_dir"], r)
    per_run = [first[d] for d in run_dirs]
    fields = run_config_fields()
    out = []
    for col in per_run[0]:
        if col.startswith(store.OVERRIDE_PREFIX):
            name = col.removeprefix(store.OVERRIDE_PREFIX).split(".")[-1]
            if name not in fields or name.endswith("seed"):
                continue  # seeds are replicates to average over, not a measure to plot against
        elif not col.startswith("het_"):
            continue
        else:
            name = col
        values = {r.get(col) for r in per_run}
        if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                   and not math.isnan(v) for v in values):
            out.append(name)
    return list(dict.fromkeys(out))


def _print_group(group: str, about: str, best: list[dict[str, Any]], common: list[str]) -> None:
    width = max(len(b["method"]) for b in best) + 2
    runs = max(b["runs"] for b in best)
    print(f"\n{group}" + (f" ({about})" if about else "")
          + (f"; all with: {' '.join(common)}" if common else ""))
    print(f"best setting per method (chosen on val: mean normalized val accuracy at the eta chosen "
          f"on val; test at that setting; up to {runs} run(s) each):")
    print(f"{'method':<{width}}{'val norm':>9}{'test norm':>10}{'test acc':>9}  {'eta':<10}{'runs':>5}  setting")
    for b in sorted(best, key=lambda b: -b["val_normalized_accuracy"]):
        etas = ",".join(f"{e:g}" for e in b["etas"])
        print(f"{b['method']:<{width}}{b['val_normalized_accuracy']:>9.3f}{b['test_normalized_accuracy']:>10.3f}"
              f"{b['test_accuracy']:>9.3f}  {etas:<10}{b['runs']:>5}  {b['setting']}")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fl-merge report",
        description="Best setting per method (chosen on validation), and plots in <dir>/report/, "
                    "for every run at any depth under a directory.")
    parser.add_argument("--version", action="version", version=version_line("fl-merge report"))
    parser.add_argument("dir", help="a multirun sweep dir, a run dir, or any dir holding runs")
    parser.add_argument("--measure", action="append",
                        help="het_ measure or run-config key for the accuracy-vs-heterogeneity "
                             "plot (repeatable; default: every one that differs across runs)")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="the split of the accuracy-vs-heterogeneity plots and run figures")
    parser.add_argument("--logx", action="store_true",
                        help="log-scale x axis of the accuracy-vs-heterogeneity plots")
    parser.add_argument("--run-figures", action="store_true",
                        help="also redraw report.png in every run directory (each run draws "
                             "its own when it ends)")
    args = parser.parse_args(argv)
    from fl_merge.stats.report import across_runs_figure, run_figure

    try:
        rows = store.load_sweep(args.dir)
    except (ValueError, OSError) as e:
        print(f"fl-merge report: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.dir).resolve() / "report"
    best = selection.best_settings(rows)
    if not best:
        print("fl-merge report: error: no selected merged rows on the val split", file=sys.stderr)
        return 2
    groups = list(dict.fromkeys(r["group"] for r in rows))
    about = selection.describe_groups(rows)
    print(f"{len({r['run_dir'] for r in rows})} run(s) in {len(groups)} group(s) under "
          f"{Path(args.dir).resolve()}; runs of different groups are never ranked together")
    written = []
    for n, group in enumerate(groups):
        in_group = [r for r in rows if r["group"] == group]
        group_best = [b for b in best if b["group"] == group]
        if not group_best:
            continue
        _print_group(group, about.get(group, ""), group_best,
                     store.common_overrides(in_group) if group.startswith("sweep") else [])
        suffix = "" if len(groups) == 1 else f"_{n + 1}"
        written.append(_plot_eta(in_group, group_best, out / f"accuracy_vs_eta{suffix}.png"))
        scores = [s for s in selection.setting_scores(in_group, "val")]
        written.append(_plot_heatmap(scores, out / f"method_setting_heatmap{suffix}.png"))
    written.insert(0, out / "best.csv")
    results.write_rows(out / "best.csv", [{**b, "etas": ",".join(f"{e:g}" for e in b["etas"])}
                                          for b in best])
    run_dirs = [d for d in dict.fromkeys(r["run_dir"] for r in rows)
                if (Path(d) / results.RESULTS_FILE).is_file()]
    if len(run_dirs) > 1:
        for measure in args.measure or _measures(rows, run_dirs):
            try:
                png = across_runs_figure(run_dirs, measure, out / f"across_{measure}.png",
                                         split=args.split, logx=args.logx)
                written += [png, png.with_suffix(".csv")]
            except ValueError as e:
                print(f"fl-merge report: skipped {measure}: {e}", file=sys.stderr)
    if args.run_figures:
        written += [run_figure(d, split=args.split) for d in run_dirs]
    print("\nwritten:")
    for p in written:
        print(f"  {p}")
    return 0
