"""Benchmark every registered merge method against Flower's numpy aggregators.

    python benchmarks/aggregation.py [--params 10_000_000 --clients 8 --device auto]
    python benchmarks/aggregation.py --model minilm-l6 --clients 8   # a real model's shapes

Builds K task vectors of P float32 parameters spread over a few large and many small
tensors (or, with --model, of the shapes of a registered model's merged parameters: the SVD
and least-squares methods' cost depends on the matrices' shapes, not only on P), then for each method, in *fresh subprocesses* (so peak memory is its own):
  * seconds: best of --repeat calls of fl_merge.methods.merge (default allocator);
  * peak extra memory: ru_maxrss after the first call minus ru_maxrss once the data exists,
    measured twice: "live" in a process run with MALLOC_MMAP_THRESHOLD_=65536, so every
    buffer above 64 KiB is mmapped and returned on free and RSS tracks live memory; and
    "rss" in the timing process with glibc's default allocator, whose heap fragmentation
    adds a variable amount on top (on CUDA: torch.cuda.max_memory_allocated instead).
Flower's equivalents (flwr.server.strategy.aggregate: aggregate, aggregate_median,
aggregate_trimmed_avg, aggregate_krum) run on the same data the same way, and a plain numpy
copy of all K*P values into preallocated buffers gives the memory-bandwidth reference.
This is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# method -> (merge params, Flower equivalent or None)
CASES = {
    "fedavg": ({}, "aggregate"),
    "task_arithmetic": ({}, "aggregate"),
    "fednova": ({}, None),
    "fedgma": ({}, None),
    "median": ({}, "aggregate_median"),
    "trimmed_mean": ({"beta": 0.25}, "aggregate_trimmed_avg"),
    "cclip": ({}, None),
    "krum": ({"f": 1}, "aggregate_krum"),
    "multikrum": ({"f": 1}, "aggregate_krum_multi"),
    "geometric_median": ({}, None),
    "ties": ({}, None),
    "dare": ({}, None),
    "breadcrumbs": ({}, None),
    "fisher": ({}, None),
    "hetero": ({}, None),
}


def layout(p: int) -> dict[str, tuple[int, ...]]:
    """A few large matrices (25/25/20/15% of P) and many small tensors for the rest."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, frac in enumerate((0.25, 0.25, 0.20, 0.15)):
        n = int(p * frac)
        cols = 1000 if n >= 1000 else 1
        shapes[f"large{i}.weight"] = (n // cols, cols)
    rest = p - sum(a * b for a, b in shapes.values())
    small = 64
    for i in range(small):
        n = rest // small + (1 if i < rest % small else 0)
        if n:
            shapes[f"small{i}.bias"] = (n,)
    return shapes


def model_layout(name: str) -> dict[str, tuple[int, ...]]:
    """The shapes of a registered model's merged (backbone) parameters; no weights loaded."""
    from fl_merge.models.registry import build_model, is_merged_key

    return {k: tuple(v.shape) for k, v in build_model(name, 2).state_dict().items()
            if is_merged_key(k)}


def shapes_for(args) -> dict[str, tuple[int, ...]]:
    return model_layout(args.model) if args.model else layout(args.params)


def build(shapes: dict[str, tuple[int, ...]], k: int, extras: bool = False):
    import torch

    g = torch.Generator().manual_seed(0)
    tvs = [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(k)]
    fis = None
    if extras:
        fis = [{n: torch.rand(s, generator=g) for n, s in shapes.items()} for _ in range(k)]
    return shapes, tvs, fis


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(args) -> dict:
    """Run one case in this (fresh) process; print a JSON line."""
    import gc

    import numpy as np
    import torch

    from fl_merge.merging.registry import resolve_device
    from fl_merge.methods import get_method, merge

    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.clients
    shapes, tvs, fis = build(shapes_for(args), k, extras=args.case == "fisher")
    needs = None if args.case == "copy" or args.case.startswith("flwr:") else get_method(args.case).needs
    theta0 = grams = None
    if needs is not None and needs.theta0:  # slerp, karcher: defined on the models
        theta0 = {n: torch.randn(s) for n, s in shapes.items()}
    if needs is not None and "gram" in needs.extras:  # regmean: X^T X / rows per 2-D weight
        grams = []
        for _ in range(k):
            xs = {n: torch.randn(64, s[1]) for n, s in shapes.items() if len(s) == 2}
            grams.append({n: x.T @ x / 64 for n, x in xs.items()})
    gc.collect()
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    base = maxrss_mb()

    if args.case == "copy":
        arrays = [[tv[n].numpy() for n in shapes] for tv in tvs]
        dst = [[np.empty_like(a) for a in row] for row in arrays]
        base = maxrss_mb()

        def run():
            for row, drow in zip(arrays, dst):
                for a, d in zip(row, drow):
                    np.copyto(d, a)
    elif args.case.startswith("flwr:"):
        from flwr.server.strategy import aggregate as fa

        name = args.case[5:]
        results = [([tv[n].numpy() for n in shapes], 100 + i) for i, tv in enumerate(tvs)]
        params, _ = CASES[args.method]
        run = {
            "aggregate": lambda: fa.aggregate(results),
            "aggregate_median": lambda: fa.aggregate_median(results),
            "aggregate_trimmed_avg": lambda: fa.aggregate_trimmed_avg(results, params.get("beta", 0.1)),
            "aggregate_krum": lambda: fa.aggregate_krum(results, params.get("f", 1), 0),
            "aggregate_krum_multi": lambda: fa.aggregate_krum(results, params.get("f", 1), k - params.get("f", 1)),
        }[name]
    else:
        params, _ = CASES.get(args.case, ({}, None))
        weights = [100 + i for i in range(k)]
        steps = [10 + 5 * i for i in range(k)]
        ex = {"fisher": fis} if fis is not None else {"gram": grams} if grams is not None else None
        if get_method(args.case).personal:  # EMR takes no client weights
            weights = None

        def run():
            out = merge(args.case, tvs, weights, steps, extras=ex, device=dev, theta0=theta0, **params)
            if cuda:
                torch.cuda.synchronize()
            return out

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cbase = torch.cuda.memory_allocated()
    out = run()
    del out
    peak = maxrss_mb() - base
    if cuda and not args.case.startswith(("flwr:", "copy")):
        peak = (torch.cuda.max_memory_allocated() - cbase) / 2**20
    best = float("nan")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = run()
        dt = time.perf_counter() - t0
        best = dt if not best <= dt else best
        del out
    return {"seconds": best, "peak_mb": peak}


def run_child(case: str, args, method: str = "") -> dict:
    """Timing process (default allocator) and live-memory process; merged results."""
    out = {}
    for live in (False, True):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--method", method,
               "--params", str(args.params), "--model", args.model, "--clients", str(args.clients),
               "--device", args.device, "--repeat", "0" if live else str(args.repeat),
               "--threads", str(args.threads)]
        env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if live else {}))
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if res.returncode != 0:
            return {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
        r = json.loads(res.stdout.strip().splitlines()[-1])
        if live:
            out["live_mb"] = r["peak_mb"]
        else:
            out.update(seconds=r["seconds"], rss_mb=r["peak_mb"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=10_000_000)
    ap.add_argument("--model", default="", help="use this registered model's merged tensor "
                    "shapes instead of --params (e.g. minilm-l6, the text backbone)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.case = args.child
        print(json.dumps(child(args)))
        return

    import torch

    from fl_merge.merging.registry import resolve_device
    from fl_merge.methods import available_methods

    k = args.clients
    shapes = shapes_for(args)
    p = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) for s in shapes.values())
    limit_mb = 2 * k * largest * 4 / 2**20
    dev = resolve_device(args.device)
    what = f"{args.model}'s merged tensors" if args.model else "float32 params"
    print(f"# K={k} clients, P={p:,} {what} in {len(shapes)} tensors "
          f"(largest {largest:,}); device={dev}; torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} torch threads, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    copy = run_child("copy", args)
    gbps = k * p * 4 / copy["seconds"] / 1e9
    print(f"# numpy streaming copy of K*P values: {copy['seconds']:.4f} s ({gbps:.1f} GB/s read)")
    print(f"# peak-memory limit 2*K*largest tensor = {limit_mb:.0f} MB\n")
    methods = [m for m in available_methods() if not args.methods or m in args.methods.split(",")]
    ta = run_child("task_arithmetic", args)  # the ratios' reference, measured in this run
    hdr = (f"{'method':<17}{'params':<11}{'seconds':>9}{'x TA s':>8}{'flower s':>10}{'speedup':>9}"
           f"{'copy bw':>9}{'live MB':>9}{'x TA MB':>8}{'rss MB':>8}{'flwr MB':>9}  live<=limit")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    flower_cache: dict[str, dict] = {}
    for m in methods:
        params, fl = CASES.get(m, ({}, None))
        r = ta if m == "task_arithmetic" else run_child(m, args)
        f = None
        if fl is not None:
            key = f"{fl}:{json.dumps(params, sort_keys=True)}"
            if key not in flower_cache:
                flower_cache[key] = run_child(f"flwr:{fl}", args, method=m)
            f = flower_cache[key]
        if "error" in r:
            print(f"{m:<17}ERROR {r['error']}")
            continue
        ps = ",".join(f"{a}={b}" for a, b in params.items()) or "-"
        fs = f"{f['seconds']:.3f}" if f and "error" not in f else "-"
        sp = f"{f['seconds'] / r['seconds']:.1f}x" if f and "error" not in f else "-"
        fm = f"{f['live_mb']:.0f}" if f and "error" not in f else "-"
        bw = f"{copy['seconds'] / r['seconds'] * 100:.0f}%"
        ok = "yes" if r["live_mb"] <= limit_mb else "NO"
        xs = f"{r['seconds'] / ta['seconds']:.1f}" if "error" not in ta else "-"
        xm = (f"{r['live_mb'] / ta['live_mb']:.1f}" if "error" not in ta and ta["live_mb"] > 0
              else "-")
        line = (f"{m:<17}{ps:<11}{r['seconds']:>9.3f}{xs:>8}{fs:>10}{sp:>9}{bw:>9}"
                f"{r['live_mb']:>9.0f}{xm:>8}{r['rss_mb']:>8.0f}{fm:>9}  {ok}")
        print(line, flush=True)
        rows.append(line)
    print("\nx TA s / x TA MB = this method's seconds / live MB over task_arithmetic's, measured"
          "\nin the same run;"
          "\ncopy bw = numpy copy time / method time (100% = as fast as copying every input once);"
          "\nspeedup = Flower seconds / ours; live MB / rss MB = extra peak resident memory of the"
          "\nfirst call in a fresh process (ru_maxrss delta) with mmap-for-all-buffers malloc /"
          " glibc default malloc; flwr MB = Flower's live MB.")


if __name__ == "__main__":
    main()
