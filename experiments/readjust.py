"""Re-mark a committed over-seed table with multiple-comparison control (issue 27), from the
table alone: no run directory, no training.

The tables of docs/experiments.md (b)-(d) were written before the marks were corrected and
kept, per comparison, the mean paired difference over n seeds and its 95% t interval but not
the per-seed values. The paired t test's p-value is a function of exactly those
(fl_merge.stats.multiplicity.p_from_t_interval), so this recovers each raw p, adjusts it over
the table (experiments/_points.py table_families: per reference the methods' comparisons one
family, the base's another; Holm), and writes back what the experiment itself now writes:
docs/<name>.csv with p_value, p_adjusted, correction, significant and family; for
step_spread and dissimilarity docs/<name>.md (its first line, the run count and time, kept);
and the figure(s).

    .venv/bin/python experiments/readjust.py step_spread dissimilarity learned_headroom diwa [--docs docs]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _points import mark_caption, markdown_table, table_families  # noqa: E402

from fl_merge.io.results import read_rows, write_rows  # noqa: E402
from fl_merge.stats.multiplicity import p_from_t_interval  # noqa: E402

MEASURES = {"step_spread": ["steps_cv"], "dissimilarity": ["mean_cosine", "b_dissimilarity"]}
NAMES = ("step_spread", "dissimilarity", "learned_headroom", "diwa")


def readjust(rows: Sequence[dict[str, Any]], correction: str = "holm") -> list[dict[str, Any]]:
    """Each row's raw p recovered from its t interval (NaN on reference rows), then adjusted
    over the table (`table_families`)."""
    for r in rows:
        r["p_value"] = (float("nan") if r["model"] == r["reference"] else
                        p_from_t_interval(r["diff"], r["diff_low"], r["diff_high"], int(r["n_seeds"])))
    return table_families(rows, correction)


def figures(name: str, rows: Sequence[dict[str, Any]], docs: Path) -> None:
    """The figure(s) the experiment draws, from the re-marked rows."""
    from _points import plot_against

    n = int(rows[0]["n_seeds"])
    if name == "step_spread":
        import step_spread as ss

        plot_against(rows, "steps_cv", docs / "step_spread.png",
                     f"K={ss.K} mnist8 tasks, steps geometric around {ss.CENTER}, spread r in "
                     f"{ss.SPREADS}; {n} seeds", [*ss.METHODS, "base"])
    elif name == "dissimilarity":
        import dissimilarity as dis

        families = {s: fam for s, (fam, _) in dis.SUITES.items()}
        for measure in ("mean_cosine", "b_dissimilarity"):
            plot_against(rows, measure, docs / f"dissimilarity_{measure}.png",
                         f"K={dis.K}, six suites, {n} seeds: merged accuracy vs {measure}",
                         [*dis.METHODS, "base"], families)
    else:
        import issue16_tables as i16

        i16.plot(rows, docs / f"{name}.png", i16.TITLES[name])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="+", choices=NAMES)
    parser.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args(argv)
    for name in args.names:
        rows = readjust(read_rows(args.docs / f"{name}.csv"))
        write_rows(args.docs / f"{name}.csv", rows)
        for ref in dict.fromkeys(r["reference"] for r in rows):
            sel = [r for r in rows if r["reference"] == ref]
            table = markdown_table(sel, MEASURES.get(name, [])) + "\n\n" + mark_caption(sel)
            print(f"## {name} vs {ref}\n\n{table}\n")
        if name in MEASURES:
            md = args.docs / f"{name}.md"
            md.write_text(md.read_text().split("\n")[0] + "\n\n" + table + "\n")
        figures(name, rows, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
