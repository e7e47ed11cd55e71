"""Shared by the replicated experiments (step_spread.py, dissimilarity.py): read one run into
a point, tabulate points over seeds with 95% CIs, and plot accuracy against a measured
heterogeneity measure.

A point is one run: {"setting": label, "seed": s, "acc": {model: mean test accuracy over
tasks at the setting chosen on validation}, "measures": {name: value from run.json
`heterogeneity`}}. `tabulate` groups points by setting; per model it gives the over-seed mean
with its t interval and the paired per-seed difference against the reference model (same
seed = same client updates), with its t interval (fl_merge.stats.intervals)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MEASURES = ("steps_cv", "mean_cosine", "b_dissimilarity")


def read_point(run_dir: Path, setting: str, seed: int, measures: Sequence[str] = MEASURES) -> dict[str, Any]:
    """One run as a point: accuracies from fl_merge.engine.replicates.run_accuracies (each method at
    its validation choice, and the base) and the `measures` found in run.json."""
    from fl_merge.engine.replicates import run_accuracies

    run, acc = run_accuracies(Path(run_dir))
    het = run.get("heterogeneity") or {}
    found = {m: float(het[m]) for m in measures if het.get(m) is not None}
    seconds = float((run.get("timings") or {}).get("total-seconds", math.nan))
    within = {str(c["model"]): bool(c.get("excludes_zero")) for c in run.get("comparison", [])}
    return {"setting": setting, "seed": seed, "acc": acc, "measures": found, "seconds": seconds,
            "within": within}


def timing_line(points: Sequence[Mapping[str, Any]]) -> str:
    """How many runs and how long they took together (run.json total-seconds)."""
    secs = [float(p.get("seconds", math.nan)) for p in points]
    known = [s for s in secs if not math.isnan(s)]
    return (f"{len(points)} runs, {sum(known) / 60:.1f} min of run time in all "
            f"({len(known)} timed; run.json timings, 2 CPU cores shared with other jobs).")


def tabulate(points: Sequence[Mapping[str, Any]], reference: str) -> list[dict[str, Any]]:
    """One row per (setting, model), settings in first-seen order: n seeds, mean accuracy and
    its 95% t CI, the paired difference vs `reference` and its CI, excludes_zero, and the mean
    of each measure over the seeds; `within_seed` 'k/n': in k of the n seeds the run's own
    paired bootstrap CI over test examples (the point's `within`) excluded 0. ValueError when
    a setting repeats a seed or a point lacks the reference."""
    from fl_merge.stats.intervals import over_seed_table, seed_marks

    settings: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        group = settings.setdefault(str(p["setting"]), [])
        if any(q["seed"] == p["seed"] for q in group):
            raise ValueError(f"setting {p['setting']} has seed {p['seed']} twice")
        if reference not in p["acc"]:
            raise ValueError(f"point {p['setting']} seed {p['seed']} has no '{reference}' accuracy "
                             f"(has {sorted(p['acc'])})")
        group.append(p)
    rows = []
    for setting, group in settings.items():
        names = sorted({n for p in group for n in p["measures"]})
        measures = {n: _mean([p["measures"].get(n, math.nan) for p in group]) for n in names}
        stats = over_seed_table({model: [float(p["acc"][model]) for p in group]
                                 for model in group[0]["acc"]}, reference)
        for model, row in stats.items():
            within = seed_marks([p.get("within", {}).get(model) for p in group])
            rows.append({"setting": setting, "model": model, **row, "within_seed": within,
                         **measures})
    return rows


def table_families(rows: Sequence[dict[str, Any]], correction: str = "holm") -> list[dict[str, Any]]:
    """Adjust the rows' raw `p_value`s over the whole table instead of per setting: per
    reference, every distinct method comparison in the table is one family (the findings), the
    base's comparisons another (whether merging helps at all). A comparison repeated in several
    settings (the same updates: same model, difference and interval) counts once and shares
    its adjusted p. Sets p_adjusted, correction, significant (p_adjusted < 0.05) and family
    (e.g. "holm over 18 methods vs fedavg") on every row, in place; reference rows and rows
    without a p-value (one seed, identical to the reference) get NaN and no mark."""
    from fl_merge.stats.multiplicity import ALPHA, adjust

    def key(r: Mapping[str, Any]) -> tuple[Any, ...]:
        return (r["reference"], r["model"], *(round(float(r[k]), 12) for k in ("diff", "diff_low", "diff_high")))

    groups: dict[tuple[str, str], dict[tuple[Any, ...], float]] = {}
    for r in rows:
        if r["model"] != r["reference"] and not math.isnan(float(r.get("p_value", math.nan))):
            kind = "base" if r["model"] == "base" else "methods"
            groups.setdefault((str(r["reference"]), kind), {})[key(r)] = float(r["p_value"])
    adjusted: dict[tuple[Any, ...], tuple[float, str]] = {}
    for (ref, kind), fam in groups.items():
        for k, q in zip(fam, adjust(list(fam.values()), correction)):
            adjusted[k] = (q, f"{correction} over {len(fam)} {kind} vs {ref}")
    for r in rows:
        q, fam = adjusted.get(key(r), (math.nan, "")) if r["model"] != r["reference"] else (math.nan, "")
        r.update(p_adjusted=q, correction=correction, significant=bool(q < ALPHA), family=fam)
    return list(rows)


def _mean(values: Sequence[float]) -> float:
    v = [float(x) for x in values if not math.isnan(float(x))]
    return sum(v) / len(v) if v else math.nan


def markdown_table(rows: Sequence[Mapping[str, Any]], measures: Sequence[str]) -> str:
    """The rows as a Markdown table in percentage points, `*` where the paired difference is
    `significant` (its p-value adjusted over its family: `over_seed_table`'s per setting or
    `table_families`' over the table), the raw and adjusted p, and in how many seeds the
    run's own bootstrap CI over test examples excluded 0 (a raw count, no mark)."""
    head = ["setting", *measures, "model", "accuracy [95% CI]", "vs " + str(rows[0]["reference"]),
            "p raw / adj.", "seeds whose own CI excl. 0 (uncorrected)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = f"{100 * r['mean']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        ref = r["model"] == r["reference"]
        if ref:
            diff = "(reference)"
        else:
            diff = (f"{100 * r['diff']:+.1f} [{100 * r['diff_low']:+.1f}, {100 * r['diff_high']:+.1f}]"
                    + (" *" if r.get("significant") else ""))
        cells = [str(r["setting"]), *(f"{float(r.get(m, math.nan)):.3g}" for m in measures),
                 str(r["model"]), acc, diff, "" if ref else _p_cell(r),
                 "" if ref else str(r.get("within_seed", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _p_cell(r: Mapping[str, Any]) -> str:
    p, q = float(r.get("p_value", math.nan)), float(r.get("p_adjusted", math.nan))
    return "-" if math.isnan(p) else f"{p:.2g} / {q:.2g}"


def mark_caption(rows: Sequence[Mapping[str, Any]]) -> str:
    """What a `*` in `markdown_table` means and over which families."""
    fams = list(dict.fromkeys(str(r["family"]) for r in rows if r.get("family")))
    where = ("; families: " + ", ".join(fams)) if fams else (
        " over each setting's comparisons against " + str(rows[0]["reference"]))
    return ("`*` = adjusted p < 0.05 (paired t test over seeds, " + str(rows[0].get("correction", "holm"))
            + " correction" + where + "); `-`: no test (identical to the reference in every seed).")


def plot_against(rows: Sequence[Mapping[str, Any]], measure: str, path: Path, title: str,
                 models: Sequence[str], families: Mapping[str, str] | None = None) -> None:
    """Two panels against `measure` (x: its mean over seeds): accuracy of each model with its
    95% CI as error bars, and its paired difference vs the reference (red star where it is
    `significant`: adjusted over the table with `table_families`, else per setting). `families` (setting -> family) draws each family with its own marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = ["o", "s", "^", "D"]
    fam_names = list(dict.fromkeys((families or {}).values())) or [""]
    ref = rows[0]["reference"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, model in enumerate(models):
        for j, fam in enumerate(fam_names):
            sel = sorted((r for r in rows if r["model"] == model
                          and (families or {}).get(str(r["setting"]), "") == fam),
                         key=lambda r: float(r[measure]))
            if not sel:
                continue
            xs = [float(r[measure]) for r in sel]
            label = f"{model}{' (' + fam + ')' if fam else ''}"
            for ax, key in ((axes[0], ""), (axes[1], "diff")):
                if key and model == ref:
                    continue
                v, lo, hi = ((f"{key}", f"{key}_low", f"{key}_high") if key
                             else ("mean", "ci_low", "ci_high"))
                ys = [float(r[v]) for r in sel]
                err = [[max(0.0, y - float(r[lo])) if not math.isnan(float(r[lo])) else 0.0
                        for y, r in zip(ys, sel)],
                       [max(0.0, float(r[hi]) - y) if not math.isnan(float(r[hi])) else 0.0
                        for y, r in zip(ys, sel)]]
                ax.errorbar(xs, ys, yerr=err, marker=markers[j % len(markers)],
                            color="black" if model == "base" else f"C{i}", capsize=3, label=label,
                            ls="--" if model == "base" else "-")
                if key:
                    for x, r in zip(xs, sel):
                        if r.get("significant"):
                            ax.annotate("*", (x, float(r[hi])), ha="center", va="bottom",
                                        color="red", fontsize=14)
    axes[0].set_ylabel("mean test accuracy over tasks")
    axes[0].set_title("mean over seeds, 95% t CI", fontsize=9)
    axes[1].set_ylabel(f"accuracy - {ref} (paired by seed)")
    axes[1].set_title(f"paired difference, 95% t CI (* = {rows[0].get('correction', 'holm')}-adjusted "
                      f"p < 0.05 over {'the table' if rows[0].get('family') is not None else 'each setting'})",
                      fontsize=9)
    axes[1].axhline(0.0, color="grey", lw=0.8)
    for ax in axes:
        ax.set_xlabel(measure + " (measured, mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dump_points(points: Sequence[Mapping[str, Any]], path: Path) -> None:
    from fl_merge.core.files import atomic_write_text

    atomic_write_text(Path(path), json.dumps(list(points), indent=1))


def experiment_args(doc: str, name: str, seeds: Sequence[int], root: Path) -> tuple[Path, Path, list[int]]:
    """The replicated experiments' command line: (--out, --docs, the --seeds to run)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", type=Path, default=root / "outputs" / name)
    parser.add_argument("--docs", type=Path, default=root / "docs")
    parser.add_argument("--seeds", default=",".join(map(str, seeds)),
                        help="run only these seeds (parallel workers); the table covers them")
    args = parser.parse_args()
    return args.out.resolve(), args.docs, [int(s) for s in args.seeds.split(",")]


def write_tables(points: Sequence[Mapping[str, Any]], out: Path, docs: Path, name: str,
                 measures: Sequence[str]) -> list[dict[str, Any]]:
    """Tabulate against fedavg, adjust over the whole table (`table_families`); write the
    points (out/points.json), docs/<name>.csv and docs/<name>.md (the run count and time, the
    table, what its marks mean); print the table; the rows."""
    from fl_merge.io.results import write_rows

    rows = table_families(tabulate(points, reference="fedavg"))
    dump_points(points, out / "points.json")
    write_rows(docs / f"{name}.csv", rows)
    table = timing_line(points) + "\n\n" + markdown_table(rows, measures) + "\n\n" + mark_caption(rows)
    (docs / f"{name}.md").write_text(table + "\n")
    print(table)
    return rows
