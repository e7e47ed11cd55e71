"""Experiment (b): training heterogeneity ACROSS tasks. FedNova (each client's true
normaliser, SGD with momentum) against FedAvg (= Task Arithmetic) as the step counts of the
K tasks spread apart.

K=4 tasks of mnist8 (one task per client); client i runs s_i = round(C * r^(i/(K-1) - 1/2))
local steps, the geometric mean C = 200 fixed, spread factor r in {1, 4, 16} (r=16:
50, 126, 317, 800). Which task gets which count rotates with the seed (seed s shifts the list
by s), so no one task is always the long-trained one. Each method searches its own lambda grid
on validation (search=paper); test only at the choice. 5 independent replicates, seeds 10-14
(seed = data-seed; client-seeds=spawn: no seed stream shared by two clients or replicates):
per spread the over-replicate mean with its 95% t CI and the paired per-replicate difference
FedNova - FedAvg with its CI, Holm-corrected over the table's families.
Writes docs/step_spread.{csv,png,md}; the x axis is the measured steps_cv of run.json.

    .venv/bin/python experiments/step_spread.py [--out outputs/step_spread]
"""

from __future__ import annotations


from _points import experiment_args, plot_against, read_point, write_tables
from _runner import ROOT, run_point

SPREADS = [1, 4, 16]
SEEDS = [10, 11, 12, 13, 14]  # experiments/_dose.py SEED0 on: never the design seeds
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
    return {"data": "tasks", "suite": "mnist8", "num-clients": K, "seed": seed, "data-seed": seed,
            "client-seeds": "spawn", "partition-probe": "heldout",
            "local-steps": ",".join(map(str, steps_for(spread, K, shift=seed))),
            "method": ",".join(METHODS), "search": "paper", "lambdas": LAMBDAS}


def main() -> None:
    out_root, docs, seeds = experiment_args(__doc__, "step_spread", SEEDS, ROOT)
    points = []
    # every spread's first seed first: a partial run still spans the spreads
    for seed in seeds:
        for spread in SPREADS:
            out = run_point(out_root / f"spread-{spread:g}" / f"seed-{seed}",
                            overrides(spread, seed))
            points.append(read_point(out, f"r={spread:g}", seed))
    points.sort(key=lambda p: float(p["setting"][2:]))
    rows = write_tables(points, out_root, docs, "step_spread", ["steps_cv"])
    plot_against(rows, "steps_cv", docs / "step_spread.png",
                 f"K={K} mnist8 tasks, steps geometric around {CENTER}, spread r in {SPREADS}; "
                 f"{len(seeds)} seeds", [*METHODS, "base"])


if __name__ == "__main__":
    main()
