"""Experiment (b): normalized accuracy vs training heterogeneity (spread of local steps),
FedAvg vs FedNova (and our hetero weighting).

K=4 clients on one task split by Dirichlet(0.3); client i runs s_i = round(S * r^(i/(K-1))
/ c) local steps with spread factor r in {1, 2, 4, 8, 16} (c keeps the mean at S=120), so
the steps' coefficient of variation grows with r while the total work stays about equal.
Writes docs/step_spread.png (+ .csv).

    .venv/bin/python experiments/step_spread.py [--out outputs/step_spread]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _runner import ROOT, run_point

SPREADS = [1, 2, 4, 8, 16]
METHODS = "fedavg,fednova,hetero"
MEAN_STEPS = 120


def steps_for(spread: float, k: int) -> list[int]:
    raw = [spread ** (i / (k - 1)) for i in range(k)]
    scale = MEAN_STEPS * k / sum(raw)
    return [max(1, round(scale * r)) for r in raw]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "step_spread")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    runs = []
    for spread in SPREADS:
        steps = steps_for(spread, args.clients)
        out = args.out.resolve() / f"spread-{spread:g}"
        run_point(out, {"data": "dirichlet", "alpha": 0.3, "num-clients": args.clients,
                        "local-steps": ",".join(map(str, steps)), "method": METHODS})
        runs.append(out)
    from fl_merge.report import across_runs_figure

    fig = across_runs_figure(runs, "steps_cv", ROOT / "docs" / "step_spread.png", y="accuracy")
    print(f"wrote {fig} and {fig.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
