"""Figures from a run's output directory (results.csv + run.json).

* `run_figure`: one run at a glance -- task-vector cosine heatmap, task-vector norms and
  per-task test accuracy (base, fine-tuned, each method at its selected eta).
* `across_runs_figure`: normalized accuracy of each method versus a heterogeneity measure
  (a ``het_<measure>`` results column or a run-config key such as ``alpha``) over many
  runs, with the plotted points written as CSV next to the PNG.

Both are drawn by the one report command, `fl-merge report DIR` (fl_merge/cli/report_cli.py:
``--run-figures`` redraws every run's figure, ``--measure NAME`` picks the across-runs
figures), and `run_figure` by every run when it ends.

Matplotlib runs on the Agg backend (set here), so this works headless.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fl_merge.core.files import atomic_write  # noqa: E402
from fl_merge.io.results import (  # noqa: E402
    RESULTS_FILE,
    RUN_FILE,
    read_rows,
    method_heading,
    own_model_methods,
    summary_rows,
    write_rows,
)

REPORT_FILE = "report.png"
HET_PREFIX = "het_"


# --------------------------------------------------------------------------- loading

def load_run(run_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of ``results.csv`` and the ``run.json`` dict of one run directory.

    Raises ValueError if the directory lacks results (run.json is optional: {} if absent).
    """
    run_dir = Path(run_dir)
    results = run_dir / RESULTS_FILE
    if not results.is_file():
        raise ValueError(f"{run_dir}: no {RESULTS_FILE} (not a run directory, or the run did not finish)")
    rows = read_rows(results)
    if not rows:
        raise ValueError(f"{results}: no result rows")
    meta_path = run_dir / RUN_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return rows, meta


def _atomic_savefig(fig: Figure, path: Path) -> Path:
    """Save `fig` as PNG at `path` atomically (fl_merge.core.files.atomic_write: temp file, fsync, rename)."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _method_order(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Method labels in order of first appearance."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(str(r["method"]), None)
    return list(seen)


def _is_selected(r: Mapping[str, Any]) -> bool:
    v = r.get("selected")
    return v is True or (isinstance(v, str) and v.lower() == "true")


def _client_labels(meta: Mapping[str, Any], k: int) -> list[str]:
    """Tick labels for the K task vectors: the clients' tasks (in client order) when those
    are K distinct names, else the run's task list, else c0..c{K-1}; duplicates numbered."""
    clients = meta.get("clients") or []
    names = [str(c.get("task", "")) for c in clients]
    if len(names) != k or not all(names):
        tasks = [str(t) for t in meta.get("tasks") or []]
        names = tasks if len(tasks) == k else [f"c{i}" for i in range(k)]
    if len(set(names)) < len(names):
        names = [f"{n} #{i}" for i, n in enumerate(names)]
    return names


# --------------------------------------------------------------------------- one run

def _title(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    config = meta.get("config") or {}
    data = config.get("data") or rows[0].get("data") or "tasks"
    k = (meta.get("heterogeneity") or {}).get("num_clients") or config.get("num-clients") \
        or rows[0].get("num_clients") or len({r["task"] for r in rows})
    extra = ""
    if data == "dirichlet" and "alpha" in config:
        extra = f", alpha={config['alpha']:g}" if isinstance(config["alpha"], (int, float)) else ""
    elif data == "pathological" and "classes-per-client" in config:
        extra = f", classes/client={config['classes-per-client']}"
    run_id = meta.get("run_id", rows[0].get("run_id", ""))
    return f"data={data}{extra}, K={k} clients  (run {run_id})"


def _draw_cosine(ax: plt.Axes, matrix: Sequence[Sequence[float]], labels: list[str]) -> None:
    """Heatmap of the K x K cosine matrix on a diverging colormap centred at 0, annotated."""
    k = len(matrix)
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    size = 9 if k <= 6 else 7 if k <= 10 else 5
    for i in range(k):
        for j in range(k):
            v = float(matrix[i][j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size,
                    color="white" if abs(v) > 0.6 else "black")
    ax.set_title("task-vector cosine similarity")


def _draw_norms(ax: plt.Axes, norms: Sequence[float], labels: list[str]) -> None:
    """Bars of the task-vector L2 norms, one per client."""
    x = range(len(norms))
    ax.bar(x, norms, color="tab:gray")
    for i, v in zip(x, norms):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(r"$\|\tau_k\|_2$")
    ax.set_title("task-vector norms")
    ax.margins(y=0.12)


def _draw_accuracy(ax: plt.Axes, rows: Sequence[Mapping[str, Any]], split: str = "test") -> None:
    """Grouped bars per task (plus the mean): base, fine-tuned and each method at its
    selected eta."""
    table = [t for t in summary_rows(rows, split=split) if t["task"] != "normalized"]
    methods = _method_order(r for r in rows if r["model"] == "merged")
    etas = {str(r["method"]): r["eta"] for r in rows
            if r["model"] == "merged" and _is_selected(r) and r["split"] == split}
    own = own_model_methods(rows)  # personal methods (EMR): each task on its own model
    series = [("base", "base"), ("finetuned", "fine-tuned"),
              *((m, method_heading(m, etas.get(m), m in own)) for m in methods)]
    n = len(series)
    width = 0.8 / n
    colors = ["lightgray", "dimgray", *plt.get_cmap("tab10").colors]
    for s, (key, label) in enumerate(series):
        xs = [i - 0.4 + width * (s + 0.5) for i in range(len(table))]
        ys = [t.get(key, math.nan) for t in table]
        ax.bar(xs, ys, width=width, label=label, color=colors[s % len(colors)])
    ax.set_xticks(range(len(table)), [t["task"] for t in table], rotation=30, ha="right", fontsize=8)
    if table and table[-1]["task"] == "mean":
        ax.axvline(len(table) - 1.5, color="black", lw=0.8, ls=":")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{split} accuracy")
    ax.set_title(f"{split} accuracy per task (merged: each method at its selected eta)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)


def run_figure(run_dir: str | os.PathLike, split: str = "test") -> Path:
    """Write ``report.png`` into `run_dir` and return its path.

    Panels: (a) task-vector cosine heatmap and (b) task-vector norms -- both only when
    run.json has a ``heterogeneity`` block -- and (c) per-task accuracy on `split`.
    """
    run_dir = Path(run_dir)
    rows, meta = load_run(run_dir)
    het = meta.get("heterogeneity") or {}
    matrix, norms = het.get("cosine_matrix"), het.get("norms")
    tasks = {r["task"] for r in rows}
    acc_width = max(9.0, 1.1 * (len(tasks) + 1))
    if matrix and norms:
        labels = _client_labels(meta, len(matrix))
        fig = plt.figure(figsize=(max(13.0, acc_width), 10.5))
        grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1], width_ratios=[1.15, 1],
                                hspace=0.35, wspace=0.3)
        _draw_cosine(fig.add_subplot(grid[0, 0]), matrix, labels)
        _draw_norms(fig.add_subplot(grid[0, 1]), norms, labels)
        _draw_accuracy(fig.add_subplot(grid[1, :]), rows, split)
    else:
        fig, ax = plt.subplots(figsize=(acc_width, 5.5))
        _draw_accuracy(ax, rows, split)
    fig.suptitle(_title(rows, meta), fontsize=13)
    return _atomic_savefig(fig, run_dir / REPORT_FILE)


# --------------------------------------------------------------------------- across runs

def measure_value(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], measure: str,
                  where: str = "run") -> float:
    """The value of `measure` for one run: the ``het_<measure>`` results column (the prefix
    may be given or not), else ``run.json["config"][measure]`` (``_``/``-`` interchangeable).

    Raises ValueError naming the measure if neither exists or the value is not a number.
    """
    name = measure.removeprefix(HET_PREFIX)
    column = HET_PREFIX + name
    value: Any = None
    if column in rows[0]:
        value = rows[0][column]
    else:
        config = meta.get("config") or {}
        for key in (measure, name, measure.replace("_", "-"), measure.replace("-", "_")):
            if key in config:
                value = config[key]
                break
    if value is None:
        raise ValueError(f"{where}: measure {measure!r} not found (no {column!r} column in "
                         f"{RESULTS_FILE} and no {measure!r} key in {RUN_FILE} config)")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: measure {measure!r} is not numeric: {value!r}") from None


def collect_points(run_dirs: Iterable[str | os.PathLike], measure: str,
                   split: str = "test") -> list[dict[str, Any]]:
    """One point per (run, method): the run's `measure` (x), and over tasks the mean
    normalized accuracy and mean accuracy of the merged rows at the method's selected eta
    on `split`. Sorted by x (then method, in order of first appearance).

    Raises ValueError if a run lacks results, the measure, or selected merged rows.
    """
    points: list[dict[str, Any]] = []
    order: dict[str, int] = {}
    for run_dir in run_dirs:
        rows, meta = load_run(run_dir)
        x = measure_value(rows, meta, measure, where=str(run_dir))
        chosen: dict[str, list[Mapping[str, Any]]] = {}
        for r in rows:
            if r["model"] == "merged" and r["split"] == split and _is_selected(r):
                chosen.setdefault(str(r["method"]), []).append(r)
        if not chosen:
            raise ValueError(f"{run_dir}: no selected merged rows on split {split!r} in {RESULTS_FILE}")
        for method, sel in chosen.items():
            order.setdefault(method, len(order))
            points.append({
                "run_dir": str(run_dir), "method": method, "x": x,
                "normalized_accuracy": sum(r["normalized_accuracy"] for r in sel) / len(sel),
                "accuracy": sum(r["accuracy"] for r in sel) / len(sel),
                "eta": sel[0]["eta"],
            })
    return sorted(points, key=lambda p: (p["x"], order[p["method"]]))


def _mean_accuracy(rows: list[Mapping[str, Any]], model: str, split: str) -> float:
    vals = [r["accuracy"] for r in rows if r["model"] == model and r["split"] == split]
    # Rows repeat base/fine-tuned once per method: the mean is unchanged by that.
    return sum(vals) / len(vals) if vals else float("nan")


def across_runs_figure(run_dirs: Iterable[str | os.PathLike], measure: str,
                       out_path: str | os.PathLike, split: str = "test",
                       logx: bool = False, y: str = "normalized_accuracy") -> Path:
    """Plot `y` (normalized_accuracy, or accuracy: absolute, with the base and fine-tuned
    means of each run as dashed references) versus `measure`, one line per method, over
    `run_dirs`; write the PNG at `out_path` and the plotted points as CSV next to it (same
    stem, ``.csv``). Returns the PNG path."""
    if y not in ("normalized_accuracy", "accuracy"):
        raise ValueError(f"y must be 'normalized_accuracy' or 'accuracy', got {y!r}")
    out_path = Path(out_path)
    run_dirs = list(run_dirs)
    points = collect_points(run_dirs, measure, split=split)
    if logx and any(p["x"] <= 0 for p in points):
        raise ValueError(f"--logx needs positive values of {measure!r}; got "
                         f"{sorted({p['x'] for p in points})}")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method in _method_order(points):
        mine = [p for p in points if p["method"] == method]
        ax.plot([p["x"] for p in mine], [p[y] for p in mine], marker="o", label=method)
    if logx:
        ax.set_xscale("log")
    if y == "accuracy":
        refs = sorted((measure_value(*load_run(d), measure, where=str(d)), load_run(d)[0]) for d in run_dirs)
        for model, style, label in (("base", "--", "base"), ("finetuned", ":", "fine-tuned (mean)")):
            ax.plot([x for x, _ in refs], [_mean_accuracy(rows, model, split) for _, rows in refs],
                    color="black", ls=style, lw=1.2, label=label)
        ax.set_ylabel(f"{split} accuracy (mean over tasks)")
    else:
        ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="fine-tuned (=1)")
        ax.set_ylabel(f"normalized {split} accuracy (mean over tasks)")
    ax.set_xlabel(measure)
    n_runs = len({p["run_dir"] for p in points})
    ax.set_title(f"merged accuracy at selected eta vs {measure} ({n_runs} runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    write_rows(out_path.with_suffix(".csv"), points)
    return _atomic_savefig(fig, out_path)
