"""Experiment (c): data heterogeneity. Merged accuracy against the measured task-vector
cosine and gradient dissimilarity (run.json `heterogeneity`: mean_cosine, b_dissimilarity)
over six suites of increasing dissimilarity, K=4 clients each, the CNN trained 150 steps:

* one task (rotate90) split across the clients: iid, Dirichlet(1.0), Dirichlet(0.1) label
  skew, every client's head a probe fitted on examples no client holds (partition-probe=heldout);
* one task per client: the mnist-near, mnist-mid and headroom-v2 (far) suites.

These are six of the dose-response's points (experiments/_dose.py, docs/experiments.md (e))
with the same 10 independent replicates (seed = data-seed = 10..19, client-seeds=spawn), so
the client updates are the dose-response's, read from the client-update cache when it ran
first: RegMean is among the methods because its clients' Gram matrices are part of that
cache key. Every run merges with Task Arithmetic (fedavg), TIES, FedGMA (rho 0.3/0.5/0.7),
the coordinate-wise median and RegMean on the same updates, each searching its own grid on
validation (search=paper, two-stage prescreen as in (e)), test only at the choice. Per suite:
the over-replicate mean with its 95% t CI and the paired per-replicate difference against
Task Arithmetic, Holm-corrected over the table's families. Accuracy is absolute: in the
split suites every client is scored on the one task's test set, in the task suites each on
its own. Writes docs/dissimilarity.{csv,md} and docs/dissimilarity_<measure>.png.

    .venv/bin/python experiments/dissimilarity.py [--out outputs/dissimilarity-v2]
"""

from __future__ import annotations


import _dose
from _points import experiment_args, plot_against, read_point, write_tables
from _runner import ROOT, run_point

K = _dose.K
SEEDS = _dose.replicate_seeds(10)
METHODS = ["fedavg", "ties", "fedgma", "median", "regmean"]
# name -> (family, the dose-response point it is)
SUITES: dict[str, tuple[str, str]] = {
    "split-iid": ("one task split", "skew-iid"),
    "split-dir1": ("one task split", "skew-a1"),
    "split-dir0.1": ("one task split", "skew-a0.1"),
    "mnist-near": ("one task per client", "tasks-near"),
    "mnist-mid": ("one task per client", "tasks-mid"),
    "headroom-v2": ("one task per client", _dose.SUITE),
}


def overrides(suite: str, seed: int) -> dict[str, object]:
    o = _dose.run_overrides(_dose.BY_NAME[SUITES[suite][1]], seed - _dose.SEED0)
    return {**o, "method": ",".join(METHODS), "method-params": "fedgma.rho=0.3|0.5|0.7"}


def main() -> None:
    out_root, docs, seeds = experiment_args(__doc__, "dissimilarity-v2", SEEDS, ROOT)
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
