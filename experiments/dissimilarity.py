"""Experiment (c): data heterogeneity. Merged accuracy against the measured task-vector
cosine and gradient dissimilarity (run.json `heterogeneity`: mean_cosine, b_dissimilarity)
over six suites of increasing dissimilarity, K=4 clients each:

* one task (rotate90) split across the clients: iid, Dirichlet(1.0), Dirichlet(0.1) label skew;
* one task per client: the mnist-near, mnist-mid and mnist-far suites.

Every point trains its clients once and merges with Task Arithmetic (fedavg), TIES, FedGMA
and the coordinate-wise median on the same updates, each searching its own grid on
validation (search=paper; FedGMA's rho over 0.3/0.5/0.7), test only at the choice. Seeds
0, 1, 2 (training seed and data seed). Per suite: the over-seed mean with its 95% t CI and
the paired per-seed difference against Task Arithmetic. Accuracy is absolute: in the split
suites every client is scored on the one task's test set, in the task suites each on its own.
Writes docs/dissimilarity.{csv,md} and docs/dissimilarity_<measure>.png.

    .venv/bin/python experiments/dissimilarity.py [--out outputs/dissimilarity]
"""

from __future__ import annotations


from _points import experiment_args, plot_against, read_point, write_tables
from _runner import ROOT, run_point

K = 4
SEEDS = [0, 1, 2]
METHODS = ["fedavg", "ties", "fedgma", "median"]
LAMBDAS = "0.05,0.1,0.2,0.3,0.5,0.7,1,1.5,2"
# name -> (family, run-config overrides), roughly in order of increasing dissimilarity.
SUITES: dict[str, tuple[str, dict[str, object]]] = {
    "split-iid": ("one task split", {"data": "iid"}),
    "split-dir1": ("one task split", {"data": "dirichlet", "alpha": 1.0}),
    "split-dir0.1": ("one task split", {"data": "dirichlet", "alpha": 0.1}),
    "mnist-near": ("one task per client", {"data": "tasks", "suite": "mnist-near"}),
    "mnist-mid": ("one task per client", {"data": "tasks", "suite": "mnist-mid"}),
    "mnist-far": ("one task per client", {"data": "tasks", "suite": "mnist-far"}),
}


def overrides(suite: str, seed: int) -> dict[str, object]:
    return {**SUITES[suite][1], "num-clients": K, "seed": seed, "data-seed": seed,
            "method": ",".join(METHODS), "method-params": "fedgma.rho=0.3|0.5|0.7",
            "search": "paper", "lambdas": LAMBDAS}


def main() -> None:
    out_root, docs, seeds = experiment_args(__doc__, "dissimilarity", SEEDS, ROOT)
    points = []
    # every suite's first seed first: a partial run still spans the suites
    for seed in seeds:
        for suite in SUITES:
            out = run_point(out_root / suite / f"seed-{seed}", overrides(suite, seed))
            points.append(read_point(out, suite, seed))
    points.sort(key=lambda p: list(SUITES).index(p["setting"]))
    rows = write_tables(points, out_root, docs, "dissimilarity", ["mean_cosine", "b_dissimilarity"])
    families = {s: fam for s, (fam, _) in SUITES.items()}
    for measure in ("mean_cosine", "b_dissimilarity"):
        plot_against(rows, measure, docs / f"dissimilarity_{measure}.png",
                     f"K={K}, six suites, {len(seeds)} seeds: merged accuracy vs {measure}",
                     [*METHODS, "base"], families)


if __name__ == "__main__":
    main()
