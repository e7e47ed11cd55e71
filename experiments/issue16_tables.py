"""Issue 16's comparisons from finished `fl-merge-run --seeds` runs (docs/experiments.md (d)):
learned coefficients (task-wise, block-wise, entropy) against Task Arithmetic and TIES on the
headroom suite, and DiWA's weight average against the best single run and the prediction
ensemble. Each setting is one run directory of seed-<s>/ replicates; every difference is
paired by seed (the same client updates) with its 95% t interval (experiments/_points.py).

    python experiments/issue16_tables.py learned block=DIR task=DIR entropy=DIR [--docs docs]
    python experiments/issue16_tables.py diwa diwa=DIR [--docs docs]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _points import mark_caption, markdown_table, read_point, table_families, tabulate  # noqa: E402

from fl_merge.io.results import write_rows  # noqa: E402

# The references each comparison is paired against.
REFERENCES = {"learned": ("task_arithmetic", "ties"), "diwa": ("task_arithmetic", "ensemble", "best-single")}
TITLES = {"learned_headroom": "Learned coefficients, headroom-v2, {n} independent replicates",
          "diwa": "DiWA: rotate90, 4 diverse runs on the same data, {n} independent replicates"}


def points(dirs: Mapping[str, Path]) -> list[dict[str, Any]]:
    """One point per (setting, seed) from each setting's seed-<s>/ run directories."""
    out = []
    for setting, root in dirs.items():
        for run in sorted(Path(root).glob("seed-*")):
            out.append(read_point(run, setting, int(run.name.split("-")[1])))
    return out


def compare(pts: Sequence[Mapping[str, Any]], references: Sequence[str]) -> list[dict[str, Any]]:
    """tabulate() once per reference: rows of every model against each reference, the
    p-values Holm-adjusted over the table (`table_families`: per reference, the methods'
    distinct comparisons one family, the base's another). The runs' own within-run bootstrap
    counts are against their Task Arithmetic, so they are kept only for the first reference."""
    rows = []
    for i, ref in enumerate(references):
        rows += tabulate(pts if i == 0 else [{**p, "within": {}} for p in pts], reference=ref)
    return table_families(rows)


def plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """One panel per reference: each (setting, model)'s paired difference with its 95% t CI,
    a red `*` only where it is `significant`: its paired t p-value Holm-adjusted over its
    family (`compare`: table_families), never the raw interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = list(dict.fromkeys(r["reference"] for r in rows))
    fig, axes = plt.subplots(1, len(refs), figsize=(5.5 * len(refs), 4.2), squeeze=False)
    for ax, ref in zip(axes[0], refs):
        sel, seen = [], set()
        for r in rows:  # a model measured alike in several settings (the same updates) once
            key = (r["model"], round(float(r["diff"]), 9), round(float(r["diff_low"]), 9))
            if r["reference"] == ref and r["model"] not in (ref, "base") and key not in seen:
                seen.add(key)
                sel.append(r)
        names = [f"{r['setting']}: {r['model']}" if r["model"].startswith("learned") else r["model"] for r in sel]
        ys = [100 * float(r["diff"]) for r in sel]
        err = [[100 * (float(r["diff"]) - float(r["diff_low"])) for r in sel],
               [100 * (float(r["diff_high"]) - float(r["diff"])) for r in sel]]
        ax.errorbar(range(len(sel)), ys, yerr=err, fmt="o", capsize=4)
        for i, r in enumerate(sel):
            if r.get("significant"):
                ax.annotate("*", (i, 100 * float(r["diff_high"])), ha="center", va="bottom", color="red",
                            fontsize=14)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(sel)), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"test accuracy - {ref}, points (paired by seed)")
        ax.set_title(f"vs {ref}: 95% t CI over seeds (* Holm-adjusted p < 0.05 over the table)",
                     fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", choices=sorted(REFERENCES))
    parser.add_argument("runs", nargs="+", help="setting=run directory (holding seed-<s>/)")
    parser.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args(argv)
    dirs = dict(item.split("=", 1) for item in args.runs)
    pts = points({k: Path(v) for k, v in dirs.items()})
    rows = compare(pts, REFERENCES[args.which])
    name = {"learned": "learned_headroom", "diwa": "diwa"}[args.which]
    write_rows(args.docs / f"{name}.csv", rows)
    plot(rows, args.docs / f"{name}.png", TITLES[name].format(n=len({p["seed"] for p in pts})))
    for ref in REFERENCES[args.which]:
        sel = [r for r in rows if r["reference"] == ref]
        print(markdown_table(sel, []), "\n\n" + mark_caption(sel), "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
