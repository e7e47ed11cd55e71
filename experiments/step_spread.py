"""Experiment (b): training heterogeneity ACROSS tasks. FedNova (each client's true
normaliser, SGD with momentum) against FedAvg (= Task Arithmetic) as the step counts of the
K tasks spread apart.

K=4 tasks of mnist8 (one task per client); client i runs s_i = round(C * r^(i/(K-1) - 1/2))
local steps, the geometric mean C = 200 fixed, spread factor r in {1, 4, 16} (r=16:
50, 126, 317, 800). Which task gets which count rotates with the seed (seed s shifts the list
by s), so no one task is always the long-trained one. Each method searches its own lambda grid
on validation (search=paper); test only at the choice. Seeds 0, 1, 2: per spread the over-seed
mean with its 95% t CI and the paired per-seed difference FedNova - FedAvg with its CI.
Writes docs/step_spread.{csv,png,md}; the x axis is the measured steps_cv of run.json.

    .venv/bin/python experiments/step_spread.py [--out outputs/step_spread]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _points import (dump_points, markdown_table, plot_against, read_point, tabulate, timing_line,
                     write_csv)
from _runner import ROOT, run_point

SPREADS = [1, 4, 16]
SEEDS = [0, 1, 2]
CENTER = 200
K = 4
METHODS = ["fedavg", "fednova"]
LAMBDAS = "0.05,0.1,0.2,0.3,0.5,0.7,1,1.5,2"


def steps_for(spread: float, k: int, center: float = CENTER, shift: int = 0) -> list[int]:
    """k step counts spaced geometrically from center/sqrt(spread) to center*sqrt(spread)
    (geometric mean `center`), rotated left by `shift`. ValueError for spread < 1 or k < 2."""
    if spread < 1 or k < 2:
        raise ValueError(f"steps_for needs spread >= 1 and k >= 2, got spread={spread}, k={k}")
    steps = [max(1, round(center * spread ** (i / (k - 1) - 0.5))) for i in range(k)]
    s = shift % k
    return steps[s:] + steps[:s]


def overrides(spread: float, seed: int) -> dict[str, object]:
    return {"data": "tasks", "suite": "mnist8", "num-clients": K, "seed": seed,
            "local-steps": ",".join(map(str, steps_for(spread, K, shift=seed))),
            "method": ",".join(METHODS), "search": "paper", "lambdas": LAMBDAS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "step_spread")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help="run only these seeds (parallel workers); the table covers them")
    args = parser.parse_args()
    points = []
    seeds = [int(s) for s in args.seeds.split(",")]
    # every spread's first seed first: a partial run still spans the spreads
    for seed in seeds:
        for spread in SPREADS:
            out = run_point(args.out.resolve() / f"spread-{spread:g}" / f"seed-{seed}",
                            overrides(spread, seed))
            points.append(read_point(out, f"r={spread:g}", seed))
    points.sort(key=lambda p: float(p["setting"][2:]))
    rows = tabulate(points, reference="fedavg")
    dump_points(points, args.out / "points.json")
    write_csv(rows, args.docs / "step_spread.csv")
    plot_against(rows, "steps_cv", args.docs / "step_spread.png",
                 f"K={K} mnist8 tasks, steps geometric around {CENTER}, spread r in {SPREADS}; "
                 f"{len(seeds)} seeds", [*METHODS, "base"])
    table = markdown_table(rows, ["steps_cv"])
    table = timing_line(points) + "\n\n" + table
    (args.docs / "step_spread.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
