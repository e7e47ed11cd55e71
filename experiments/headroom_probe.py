"""Headroom probe: one Task Arithmetic point in one process, the run path's pieces without
Flower (no Ray start-up, one thread), for choosing the headroom suite (docs/headroom.md).

The same steps as a run (clients/training.py, fl_merge/round): theta0 from the model cache,
each task's data from the data seed, its probe head fitted on base features of its TRAIN
split (disjoint from the validation split that picks lambda), the backbone fine-tuned with the
client's training seed (fl_merge/core/seeds.py), tau_i = theta_i - theta0, Task Arithmetic
theta0 + lambda * sum_i tau_i scored on validation for every lambda of the grid, lambda chosen
by the mean normalized validation accuracy (merged / fine-tuned, fl_merge/stats/selection.py).

--report val (the default; how the suite is chosen, docs/headroom.md): base, individual and
Task Arithmetic at the chosen lambda are validation accuracies and the test split is never
scored. --report test: they are test accuracies at that choice (the first search, made on
test with seed 0, reproduces with --report test --data-seed 0 --client-seeds offset).
Prints one JSON line (gain, recovery = gain_recovered, chosen lambda, wall time) and appends
it to --log.

    PYTHONPATH=$PWD .venv/bin/python experiments/headroom_probe.py \\
        --tasks rotate90,invert,patch-shuffle --steps 50 --seed 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="mnist-far")
    p.add_argument("--tasks", default="", help="comma list (default: the suite's tasks)")
    p.add_argument("--k", type=int, default=4, help="the first K tasks")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=40)
    p.add_argument("--model", default="mnist-cnn")
    p.add_argument("--seed", type=int, default=0, help="root of the clients' training seeds")
    p.add_argument("--data-seed", type=int, default=None, help="the tasks' data seed (default: --seed)")
    p.add_argument("--client-seeds", default="spawn", choices=("spawn", "offset"))
    p.add_argument("--report", default="val", choices=("val", "test"),
                   help="the split base/individual/TA are reported on (val: test never scored)")
    p.add_argument("--log", default="outputs/headroom_probe.jsonl")
    return p


def probe(a: argparse.Namespace) -> dict[str, Any]:
    """One point: the record main() prints."""
    t0 = time.time()
    from fl_merge.core.seeds import client_seeds
    from fl_merge.merging.search import LAMBDAS
    from fl_merge.models.evaluation import evaluate
    from fl_merge.models.registry import PretrainConfig, pretrained_backbone
    from fl_merge.stats.heterogeneity import cosine_matrix, gain_recovered
    from fl_merge.tasks.registry import load_task, suite_tasks
    from fl_merge_clients.training import LocalTrainConfig, fine_tune, model_for_task

    names = (a.tasks.split(",") if a.tasks else suite_tasks(a.suite))[: a.k]
    data_seed = a.seed if a.data_seed is None else a.data_seed
    seeds = client_seeds(a.seed, len(names), a.client_seeds)
    theta0 = pretrained_backbone(a.model, PretrainConfig(steps=a.pretrain_steps, seed=0), progress=False)
    tasks, heads, taus, base, ft = [], [], [], [], []
    for name, seed in zip(names, seeds):
        task = load_task(name, data_seed)
        model = model_for_task(a.model, task, theta0, seed)  # head: probe on train features
        heads.append({f"head.{k}": v.clone() for k, v in model.head.state_dict().items()})
        base.append(evaluate(model, getattr(task, a.report))[0])
        fine_tune(model, task, LocalTrainConfig(a.steps, a.lr, a.batch_size, seed))
        ft.append((evaluate(model, task.val)[0], evaluate(model, getattr(task, a.report))[0]))
        state = model.state_dict()
        taus.append({k: state[k] - theta0[k] for k in theta0})
        tasks.append(task)
    total = {k: sum(t[k] for t in taus) for k in theta0}

    def scores(lam: float, split: str) -> list[float]:
        merged = {k: theta0[k] + lam * total[k] for k in theta0}
        return [evaluate(model_for_task(a.model, t, {**merged, **h}, 0), getattr(t, split))[0]
                for t, h in zip(tasks, heads)]

    val = {lam: scores(lam, "val") for lam in LAMBDAS}
    norm_val = {lam: sum(v / f[0] for v, f in zip(val[lam], ft)) / len(ft) for lam in LAMBDAS}
    lam = max(LAMBDAS, key=lambda x: norm_val[x])  # first of equals, as the run's selection
    ta = val[lam] if a.report == "val" else scores(lam, "test")
    individual = [f[1] for f in ft]
    try:
        recovery = round(gain_recovered(base, individual, ta), 3)
    except ValueError:  # no fine-tuning gain: no share of it to keep
        recovery = None
    cos = cosine_matrix(taus)
    k = len(taus)
    return {"tasks": names, "model": a.model, "steps": a.steps, "lr": a.lr,
            "pretrain_steps": a.pretrain_steps, "seed": a.seed, "data_seed": data_seed,
            "client_seeds": a.client_seeds, "report": a.report,
            "base": round(sum(base) / k, 4), "individual": round(sum(individual) / k, 4),
            "ta": round(sum(ta) / k, 4), "lambda": lam,
            "gain": round((sum(individual) - sum(base)) / k, 4),
            "recovery": recovery,
            "mean_cosine": round(float((cos.sum() - k) / (k * k - k)), 3) if k > 1 else None,
            "per_task_base_individual_ta": {n: [round(x, 3) for x in v]
                                            for n, v in zip(names, zip(base, individual, ta))},
            "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    torch.set_num_threads(1)
    a = parser().parse_args()
    line = json.dumps(probe(a))
    print(line)
    Path(a.log).parent.mkdir(parents=True, exist_ok=True)
    with open(a.log, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
