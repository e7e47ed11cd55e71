"""The dose-response's figures (CI bands) and Markdown tables (experiments/dose_response.py).

Rows are experiments/_points.py's tabulated rows (one per point x model, `diff` = model -
Task Arithmetic paired by replicate, its 95% t interval, p raw and adjusted per point by
_dose.point_families); predictor rows are fl_merge.stats.predictors.rank_predictors'."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LOSSES = {"individual": "individual - TA (TA's loss vs the individual models)",
          "multitask": "multi-task - TA (the one-shot FL gap)"}


def slug(series: str) -> str:
    """A file-name part for a series: its first word, lower case ('label skew ...' -> 'label')."""
    return re.sub(r"[^a-z0-9]+", "-", series.lower().split()[0]).strip("-")


def _band(ax, xs, rows, color, label, marker="o"):
    def bound(key: str) -> list[float]:  # a NaN bound (one replicate) draws no band
        return [100 * float(r[key]) if not math.isnan(float(r[key])) else y for r, y in zip(rows, ys)]

    ys = [100 * float(r["diff"]) for r in rows]
    lo, hi = bound("diff_low"), bound("diff_high")
    ax.plot(xs, ys, marker=marker, color=color, label=label)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
    for x, r, h in zip(xs, rows, hi):
        if r.get("significant"):
            ax.annotate("*", (x, h), ha="center", va="bottom", color=color, fontsize=13)


def plot_series(rows: Sequence[Mapping[str, Any]], series: str, doses: Sequence[tuple[str, str]],
                methods: Sequence[str], path: Path, replicates: int) -> bool:
    """Two panels along the series' points (x: its doses, in order of increasing
    heterogeneity): Task Arithmetic's loss against the individual models and against the
    multi-task model, and each method's difference to Task Arithmetic; lines are means over
    replicates, bands their 95% paired t intervals, `*` a Holm-adjusted p < 0.05 within the
    point's family. False (nothing drawn) when none of its points has rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(str(r["setting"]), str(r["model"])): r for r in rows}
    present = [(i, p, label) for i, (p, label) in enumerate(doses) if (p, "task_arithmetic") in by
               or any((p, m) in by for m in methods)]
    if not present:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, models, names in ((axes[0], list(LOSSES), LOSSES),
                              (axes[1], [m for m in methods if m != "task_arithmetic"], {})):
        for j, model in enumerate(models):
            pts = [(i, by[(p, model)]) for i, p, _ in present if (p, model) in by]
            if pts:
                _band(ax, [i for i, _ in pts], [r for _, r in pts], f"C{j}", names.get(model, model))
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks([i for i, _, _ in present], [label for _, _, label in present], rotation=20, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy difference, points (paired by replicate)")
    axes[0].set_title("Task Arithmetic's loss (positive: TA is below)", fontsize=9)
    axes[1].set_title("method - Task Arithmetic (* Holm-adjusted p < 0.05 within the point)", fontsize=9)
    counts = [int(by[(p, "task_arithmetic")].get("n_seeds", 0)) for _, p, _ in present
              if (p, "task_arithmetic") in by]
    n = min(counts) if counts else 0
    fig.suptitle(f"{series}: means over {n} of {replicates} planned replicates, 95% t bands", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_predictors(tables: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    """One panel per target: each measure's leave-one-point-out R^2 with its cluster-bootstrap
    95% interval (horizontal bars, best on top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.2), squeeze=False)
    for ax, (target, rows) in zip(axes[0], tables.items()):
        rows = [r for r in rows if not math.isnan(float(r["r2_heldout"]))][::-1]
        ys = range(len(rows))
        vals = [float(r["r2_heldout"]) for r in rows]
        err = [[max(0.0, v - float(r["r2_low"])) if not math.isnan(float(r["r2_low"])) else 0.0
                for v, r in zip(vals, rows)],
               [max(0.0, float(r["r2_high"]) - v) if not math.isnan(float(r["r2_high"])) else 0.0
                for v, r in zip(vals, rows)]]
        ax.barh(list(ys), vals, xerr=err, color="C0", alpha=0.7, capsize=3)
        ax.set_yticks(list(ys), [str(r["measure"]) for r in rows], fontsize=8)
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("held-out R^2 (leave one point out), 95% bootstrap CI over points")
        ax.set_title(LOSSES.get(target.removeprefix("loss_"), target), fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pp(v: Any, sign: bool = True) -> str:
    x = float(v)
    return "-" if math.isnan(x) else (f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}")


def results_markdown(rows: Sequence[Mapping[str, Any]], measures: Sequence[str]) -> str:
    """Per point and model: accuracy [95% t CI], difference to Task Arithmetic [95% paired t
    CI] with `*` where its Holm-adjusted p < 0.05 within the point's family, p raw / adjusted,
    the minimum detectable difference (`mdd`) and the point's mean measures; in percentage
    points."""
    head = ["point", "model", "n", "accuracy [95% CI]", "vs task_arithmetic [95% CI]", "p raw / adj.",
            "MDD", *measures]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref = r["model"] == r["reference"]
        diff = "(reference)" if ref else (f"{_pp(r['diff'])} [{_pp(r['diff_low'])}, {_pp(r['diff_high'])}]"
                                          + (" *" if r.get("significant") else ""))
        p, q = float(r.get("p_value", math.nan)), float(r.get("p_adjusted", math.nan))
        cells = [str(r["setting"]), str(r["model"]), str(r.get("n_seeds", "")),
                 f"{_pp(r['mean'], False)} [{_pp(r['ci_low'], False)}, {_pp(r['ci_high'], False)}]", diff,
                 "" if ref or math.isnan(p) else f"{p:.2g} / {q:.2g}",
                 "" if ref else _pp(r.get("mdd", math.nan), False),
                 *(f"{float(r.get(m, math.nan)):.3g}" for m in measures)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RESULTS_CAPTION = ("`*` = Holm-adjusted p < 0.05 (paired t test over replicates) within the point's "
                   "family: the methods' differences to Task Arithmetic are one family per point, the "
                   "references' (base, individual, multitask) another. individual's difference is "
                   "TA's loss against the individual models with the sign flipped (individual - TA), "
                   "multitask's the one-shot FL gap (multi-task - TA). Intervals are unadjusted 95% t "
                   "intervals. MDD: the smallest true difference the row's test would detect with "
                   "80% power at Holm's strictest level (0.05 / family size), given the spread of "
                   "its differences over the replicates, in points.")


def predictors_markdown(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Per target, the measures ranked by held-out R^2 (leave one point out), its 95%
    cluster-bootstrap interval over points, the in-sample R^2, slope and Kendall's tau over
    the point means."""
    out = []
    for target, rows in tables.items():
        out.append(f"**{LOSSES.get(target.removeprefix('loss_'), target)}**\n")
        out.append("| measure | runs / points | held-out R^2 [95% CI] | in-sample R^2 | slope | "
                   "Kendall tau over points (p) |")
        out.append("|---|---|---|---|---|---|")
        for r in rows:
            def f(k: str, spec: str = ".2f", r: Mapping[str, Any] = r) -> str:
                return "-" if math.isnan(float(r[k])) else format(float(r[k]), spec)

            out.append(f"| {r['measure']} | {r['n_runs']} / {r['n_points']} | {f('r2_heldout')} "
                       f"[{f('r2_low')}, {f('r2_high')}] | {f('r2_in_sample')} | {f('slope', '.3g')} | "
                       f"{f('kendall_tau')} ({f('kendall_p', '.2g')}) |")
        out.append("")
    return "\n".join(out)


def cost_markdown(costs: Sequence[Mapping[str, Any]]) -> str:
    """Where the time went, per point (means over its runs, seconds) and in all."""
    keys = ("wall", "total", "train_and_other", "merge", "scoring", "train_client_sum", "multitask")
    points = list(dict.fromkeys(str(c["point"]) for c in costs))
    lines = ["| point | runs | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]

    def mean(vals: list[float]) -> str:
        v = [x for x in vals if not math.isnan(x)]
        return f"{sum(v) / len(v):.0f}" if v else "-"

    for p in points:
        cs = [c for c in costs if str(c["point"]) == p]
        cells = " | ".join(mean([float(c[k]) for c in cs]) for k in keys)
        lines.append(f"| {p} | {len(cs)} | {cells} |")
    total = {k: sum(float(c[k]) for c in costs if not math.isnan(float(c[k]))) for k in keys}
    lines.append(f"| **all (sum)** | {len(costs)} | " + " | ".join(f"{total[k]:.0f}" for k in keys) + " |")
    return "\n".join(lines)


def effects_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """_dose.dose_effects's rows: per series and dose, the model's accuracy difference to the
    series' first dose [95% paired t CI], `*` where the p adjusted within the series < 0.05."""
    lines = ["| quantity | series | dose | vs | n | difference [95% CI] | p raw / adj. |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p, q = float(r["p_value"]), float(r["p_adjusted"])
        mark = " *" if r["significant"] else ""
        lines.append(f"| {r['quantity']} | {r['series']} | {r['dose']} | {r['against']} | {r['n']} | {float(r['diff']):+.1f} "
                     f"[{float(r['diff_low']):+.1f}, {float(r['diff_high']):+.1f}]{mark} | "
                     + ("-" if math.isnan(p) else f"{p:.2g} / {q:.2g}") + " |")
    return "\n".join(lines)
