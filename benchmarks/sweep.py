"""Benchmark: an ablation sweep that trains once and aggregates many times.

    python benchmarks/sweep.py [--local-steps 30 --clients 4]

Runs the real `fl-merge` command (python -m fl_merge: Hydra -> fl_merge.engine.run.run, the one run
path shared with fl-merge-run and the experiments: run_simulation in a child
process) with a fresh client-update cache (FL_MERGE_CACHE in a temp dir):

1. one cold single-method single-eta run (fedavg, eta 1): the cost of one fresh run;
2. the sweep, S methods x L etas over K clients, in ONE run (`method.name=[...]
   eval.etas=[...]`: one training pass, every method scored at every eta), cold;
3. the same sweep again: every client update comes from the cache.

Prints the wall-clock seconds of each, the cold/cached cost ratio of the sweep, and the
ratio of S*L separate fresh runs (estimated as S*L times run 1) to the cached sweep.
The base model is pretrained into the temp cache before run 1, so no run pays for it.
This is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["fedavg", "fedgma", "median", "trimmed_mean", "ties", "dare"]
ETAS = [0.5, 1, 1.5, 2, 3]


def fl_merge(args: list[str], env: dict, cwd: Path) -> tuple[float, Path]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fl_merge", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"fl-merge {' '.join(args)} failed ({proc.returncode})")
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")))
    return seconds, run_dir


def cached_clients(run_dir: Path) -> str:
    clients = json.loads((run_dir / "run.json").read_text())["clients"]
    return f"{sum(int(c['cached']) for c in clients)}/{len(clients)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (cache and runs)")
    args = parser.parse_args()
    s, l, k = len(METHODS), len(ETAS), args.clients
    work = Path(tempfile.mkdtemp(prefix="fl-merge-sweep-bench-"))
    env = {**os.environ, "FL_MERGE_CACHE": str(work / "cache")}
    common = [f"num_clients={k}", f"training.local_steps={args.local_steps}"]
    try:
        pretrain = ("from fl_merge.config.run_config import RunConfig as R;"
                    "from fl_merge.models.registry import PretrainConfig as P, pretrained_backbone as b;"
                    "r=R(); b(r.model, P(steps=r.pretrain_steps, seed=r.pretrain_seed), progress=False)")
        subprocess.run([sys.executable, "-c", pretrain], env=env, check=True)
        one, one_dir = fl_merge(["method=fedavg", "eval.etas=1", "seed=1", *common,
                                 f"hydra.run.dir={work / 'single'}"], env, work)
        sweep = [f"method.name=[{','.join(METHODS)}]", f"eval.etas=[{','.join(map(str, ETAS))}]", *common]
        cold, cold_dir = fl_merge([*sweep, f"hydra.run.dir={work / 'cold'}"], env, work)
        cached, cached_dir = fl_merge([*sweep, f"hydra.run.dir={work / 'cached'}"], env, work)
        hits = [cached_clients(d) for d in (one_dir, cold_dir, cached_dir)]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    print(f"fl-merge sweep benchmark: S={s} methods x L={l} etas, K={k} clients, "
          f"local-steps={args.local_steps}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print(f"  methods {','.join(METHODS)}; etas {','.join(map(str, ETAS))}")
    print(f"  one cold run (1 method, 1 eta):      {one:7.1f} s   clients cached {hits[0]}")
    print(f"  sweep, one run, cold:                {cold:7.1f} s   clients cached {hits[1]}")
    print(f"  sweep, one run, cached updates:      {cached:7.1f} s   clients cached {hits[2]}")
    print(f"  cold / cached sweep:                 {cold / cached:7.2f} x")
    print(f"  {s}x{l}={s * l} separate fresh runs (est. {s * l} x {one:.1f} s = {s * l * one:.0f} s) "
          f"/ cached sweep: {s * l * one / cached:.1f} x (target >= 20x)")


if __name__ == "__main__":
    main()
