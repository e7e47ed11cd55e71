"""Choosing the headroom suite on validation, with design seeds that are never reported.

Every candidate (the configurations of docs/headroom.md's first search with K >= 3 tasks) is
probed (experiments/headroom_probe.py, --report val: the test split is never scored) at each
design seed, data and training seed alike (independent client seeds, client-seeds=spawn).
The rule, fixed before running (docs/headroom.md, "How the suite is chosen"):

    keep the candidates whose mean over design seeds has gain >= 10 points and recovery >= 40%
    (issue 14's criterion); among them take the largest room = individual - Task Arithmetic
    (what a better merge could still recover); ties: fewer local steps.

Writes docs/headroom_design.csv (one row per candidate and design seed, then the mean rows)
and prints the choice. Design seeds must differ from the seeds any report uses.

    PYTHONPATH=$PWD .venv/bin/python experiments/headroom_design.py --jobs 2
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

DESIGN_SEEDS = (1000, 1001)
DEMO = "rotate90,invert,patch-shuffle,digits8x8"
HEADROOM = "rotate90,invert,patch-shuffle"
# name -> headroom_probe options (the first search's rows with K >= 3)
CANDIDATES: dict[str, dict[str, Any]] = {
    "readme-demo": {"tasks": DEMO},
    "lr003": {"tasks": DEMO, "lr": 0.003},
    "steps50": {"tasks": DEMO, "steps": 50},
    "steps25": {"tasks": DEMO, "steps": 25},
    "mnist-near": {"suite": "mnist-near"},
    "mnist-mid": {"suite": "mnist-mid"},
    "noise-for-digits": {"tasks": "rotate90,invert,noise,patch-shuffle"},
    "headroom": {"tasks": HEADROOM, "k": 3, "steps": 50},
    "headroom-150": {"tasks": HEADROOM, "k": 3},
    "headroom-150-pretrain400": {"tasks": HEADROOM, "k": 3, "pretrain_steps": 400},
}
MIN_GAIN, MIN_RECOVERY = 0.10, 0.40


def _one(job: tuple[str, int]) -> dict[str, Any]:
    import torch

    from headroom_probe import parser, probe

    torch.set_num_threads(1)
    name, seed = job
    args = parser().parse_args([])
    for key, value in {**CANDIDATES[name], "seed": seed, "report": "val"}.items():
        setattr(args, key, value)
    rec = probe(args)
    return {"config": name, "design_seed": seed, "tasks": "|".join(rec["tasks"]), "k": len(rec["tasks"]),
            "local_steps": rec["steps"], "lr": rec["lr"], "pretrain_steps": rec["pretrain_steps"],
            **{k: rec[k] for k in ("base", "individual", "ta", "lambda", "gain", "recovery",
                                   "mean_cosine", "wall_s")}}


def choose(means: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The rule of the module docstring over the per-candidate mean rows."""
    ok = [m for m in means if m["gain"] >= MIN_GAIN and (m["recovery"] or 0) >= MIN_RECOVERY]
    return min(ok, key=lambda m: (-(m["individual"] - m["ta"]), m["local_steps"])) if ok else None


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One mean row per candidate over its design seeds (recovery of the means)."""
    from fl_merge.stats.heterogeneity import gain_recovered

    out = []
    for name in CANDIDATES:
        got = [r for r in rows if r["config"] == name]
        if not got:
            continue
        mean = {k: sum(float(r[k]) for r in got) / len(got) for k in ("base", "individual", "ta", "wall_s")}
        gain = mean["individual"] - mean["base"]
        rec = gain_recovered(mean["base"], mean["individual"], mean["ta"]) if gain > 0 else None
        out.append({**got[0], "design_seed": "mean", **{k: round(v, 4) for k, v in mean.items()},
                    "lambda": ";".join(str(r["lambda"]) for r in got), "gain": round(gain, 4),
                    "recovery": None if rec is None else round(rec, 3),
                    "mean_cosine": round(sum(float(r["mean_cosine"]) for r in got) / len(got), 3),
                    "room": round(mean["individual"] - mean["ta"], 4)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--seeds", default=",".join(map(str, DESIGN_SEEDS)))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "headroom_design.csv")
    a = p.parse_args()
    from fl_merge.io.results import write_rows

    jobs = [(name, int(s)) for s in a.seeds.split(",") for name in CANDIDATES]
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        rows = []
        for rec in pool.map(_one, jobs):
            print(rec, flush=True)
            rows.append(rec)
    means = summarise(rows)
    write_rows(a.out, [*rows, *means])
    for m in means:
        print(f"{m['config']:<26} gain {100 * m['gain']:5.1f}  recovery {m['recovery']}  "
              f"room {100 * m['room']:5.1f}")
    pick = choose(means)
    print("chosen:", pick["config"] if pick else "none passes the rule")


if __name__ == "__main__":
    main()
