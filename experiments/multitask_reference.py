"""Multi-task reference: the model trained jointly on the union of the clients' data (issue 27
item 4's one-shot FL gap is Task Arithmetic's loss against it). One process, no Flower.

The run's pieces as a run builds them, from run-config keys (KEY=VALUE, the Flower run-config
names; RunConfig's defaults otherwise, i.e. the README demo: mnist-cnn, tasks rotate90, invert,
patch-shuffle, digits8x8, local-steps 150, lr 0.01, batch-size 64, seed 0, data-seed 0):
theta0 as the ServerApp loads it (strategies/server_app.py load_theta0), client i's data as
its ClientApp does (data=tasks: its task; otherwise its partition), and client i's probe head
fitted on theta0's features with client i's training seed (clients/training.py
model_for_task). The backbone is then trained jointly through the K frozen heads
(fl_merge/models/multitask.py train_multitask) and scored per task on val and test.

Budget: --steps (default: the clients' mean local steps, each joint step seeing one minibatch
of every client: as many minibatches as all clients together), --lr (default: the clients'
mean lr), the clients' batch size (their first, if they differ), training seed = the run's
`seed`. One thread, like a simulated client.

    .venv/bin/python experiments/multitask_reference.py [KEY=VALUE ...] [--steps N] [--lr LR]
        [--out outputs/multitask_reference.csv]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def client_task(resolved, pid: int):
    """Client `pid`'s TaskData, built by the client's own code from the task config."""
    from fl_merge_clients.client_app import task_for

    return task_for(resolved.task_config(), pid)


def reference(overrides: Mapping[str, object], steps: int = 0, lr: float = 0.0) -> dict[str, Any]:
    """The multi-task reference of the run these run-config `overrides` (dashed keys, values
    as a run takes them) describe: {"rows": one per client (client, task, base-* and
    multitask-* val/test accuracy and loss, the budget) and a last "mean" row (the mean over
    the K clients), "steps", "lr", "batch", "first_loss", "last_loss", "seconds": {setup,
    training, scoring, total}}. `steps` / `lr` 0: the module docstring's defaults. Runs on one
    torch thread (restored afterwards), like a simulated client."""
    from fl_merge.config.run_config import RunConfig
    from fl_merge.models.device import client_device
    from fl_merge.models.multitask import default_multitask_steps, score_multitask, train_multitask
    from fl_merge_clients.training import model_for_task
    from fl_merge_strategies.server_app import load_theta0

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resolved = RunConfig.from_flower(dict(overrides)).resolve()
        run, k = resolved.run, len(resolved.tasks)
        steps = steps or default_multitask_steps(resolved.local_steps)
        lr = lr or sum(resolved.lrs) / k
        batch = resolved.batch_sizes[0]
        device = client_device(run.device)

        theta0 = load_theta0(resolved)
        tasks = [client_task(resolved, i) for i in range(k)]
        models = [model_for_task(run.model, t, theta0, resolved.seeds[i], device) for i, t in enumerate(tasks)]
        heads = [m.head for m in models]
        t_setup = time.perf_counter() - t0
        res = train_multitask(models[0].backbone, heads, tasks, steps=steps, lr=lr, batch_size=batch,
                              seed=run.seed, desc="multi-task")
        t_train = time.perf_counter() - t0 - t_setup
        base = score_multitask(models[0].backbone, theta0, heads, tasks)
        mtl = score_multitask(models[0].backbone, res.state, heads, tasks)
    finally:
        torch.set_num_threads(threads)

    common = {"model": run.model, "steps": res.steps, "lr": lr, "batch-size": batch,
              "seed": run.seed, "data-seed": run.data_seed, "data": run.data}
    rows: list[dict[str, Any]] = [
        {"client": i, "task": t.name, **{f"base-{m}": v for m, v in b.items()},
         **{f"multitask-{m}": v for m, v in r.items()}, **common}
        for i, (t, b, r) in enumerate(zip(tasks, base, mtl))]
    mean = {key: sum(r[key] for r in rows) / k for key in rows[0] if key.startswith(("base-", "multitask-"))}
    rows.append({"client": "mean", "task": "mean", **mean, **common})
    total = time.perf_counter() - t0
    return {"rows": rows, "model": run.model, "k": k, "steps": res.steps, "lr": lr, "batch": batch,
            "seed": run.seed, "data_seed": run.data_seed, "first_loss": res.first_loss,
            "last_loss": res.last_loss,
            "seconds": {"setup": t_setup, "training": t_train, "scoring": total - t_setup - t_train,
                        "total": total}}


def write_reference(result: Mapping[str, Any], out: Path) -> Path:
    """The reference's rows as CSV at `out` (one row per client, then the mean)."""
    rows = result["rows"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config keys")
    p.add_argument("--steps", type=int, default=0, help="joint SGD steps (0: clients' mean)")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (0: clients' mean)")
    p.add_argument("--out", default="outputs/multitask_reference.csv")
    a = p.parse_args()
    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        p.error(f"overrides are KEY=VALUE run-config keys, got {bad}")
    res = reference(dict(o.split("=", 1) for o in a.overrides), a.steps, a.lr)
    out = write_reference(res, Path(a.out))
    rows, sec = res["rows"], res["seconds"]
    print(f"multi-task reference: {res['model']}, K={res['k']}, {res['steps']} joint steps, lr {res['lr']:g}, "
          f"batch {res['batch']}, seed {res['seed']}, data-seed {res['data_seed']}; train loss "
          f"{res['first_loss']:.3f} -> {res['last_loss']:.3f}")
    print(f"{'task':<16}{'base test':>10}{'mtl val':>10}{'mtl test':>10}")
    for r in rows:
        print(f"{r['task']:<16}{r['base-test-accuracy']:>10.4f}{r['multitask-val-accuracy']:>10.4f}"
              f"{r['multitask-test-accuracy']:>10.4f}")
    print(f"wall {sec['total']:.1f} s (setup {sec['setup']:.1f}, training {sec['training']:.1f}, scoring "
          f"{sec['scoring']:.1f}); wrote {out}")


if __name__ == "__main__":
    main()
