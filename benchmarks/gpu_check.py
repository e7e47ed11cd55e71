"""The prepared GPU check (issues 17 and 28): four measurements, cuda against cpu side by side, in
at most about 8 minutes on one GPU. Run it through `benchmarks/gpu_check.sh [OUT_DIR]`.

  aggregation  fl_merge.merge of K=8 task vectors of --params float32 parameters, per method,
               best of 3 on cpu and on cuda: seconds and the cpu/cuda ratio;
  chunked      a large-model round's merge (fl_merge/round/group_merge.py): the task vectors of
               K=4 clients on disk (memory-mapped, as the ServerApp reads them), merged group
               by group (--chunk-mib of task vectors per group, each group's Delta written to
               disk at once) on each device, per method: seconds, the cpu/cuda ratio and the
               largest |difference| between the two devices' Deltas;
  minilm       MiniLM-L6 fine-tuning steps per second (batch 32, 64 tokens, SGD) on cpu and on
               cuda: the ratio;
  vision8      one vision8 run (EfficientNet-Lite0, 8 clients x 200 steps, Task Arithmetic and
               TIES with the per-method search) with device=cuda and 0.25 GPU per simulated
               client: wall time, chosen lambda and mean test accuracy (pass --vision8-steps to
               shorten it).

It writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (the short report to copy into
docs/results.md). Without a CUDA GPU it stops with one line and exit code 2, before writing
anything. `--devices cpu,cpu --parts aggregation,minilm` runs the same code on the CPU only
(how the tests check the script itself); its ratios then say nothing about a GPU.
This is a benchmark script, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("aggregation", "chunked", "minilm", "vision8")
CHUNKED_METHODS = ("fedavg", "median", "ties", "tsv_m", "iso_c")  # coordinate-wise and per-matrix
CHUNKED_PARAMS = {"ties": {"convention": "mergekit"}}  # per tensor: merged group by group
METHODS = ("fedavg", "median", "trimmed_mean", "ties", "geometric_median", "fisher",
           # issue 26's methods: per-matrix SVD (tsv_m, iso_c, iso_cts), per-matrix Adam (wudi),
           # whole-vector order statistics (pcb), the mergekit family (della, sce, karcher)
           "tsv_m", "iso_c", "iso_cts", "wudi", "consensus", "pcb", "della", "sce", "karcher")
# Shorter runs of the iterative methods (the cpu side would take minutes at their defaults);
# each row records the parameters it ran with.
PARAMS = {"wudi": {"iters": 20}}


class NoGPU(RuntimeError):
    """The check was asked for cuda but torch sees no CUDA device."""


def check_devices(devices: list[str]) -> None:
    """Every device named must exist: one clear error otherwise (before any work)."""
    import torch

    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        raise NoGPU(f"gpu_check: torch {torch.__version__} sees no CUDA GPU on this machine; "
                    "run it where one is (or pass --devices cpu,cpu to test the script itself)")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_seconds(fn: Callable[[], object], device: str, repeat: int = 3) -> float:
    """Best wall time of `repeat` calls after one warm-up call."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def aggregation(devices: list[str], params: int, clients: int = 8) -> list[dict]:
    """Seconds per merge for each method on each device, and the ratio first/second."""
    import torch

    from fl_merge.methods import get_method, merge

    g = torch.Generator().manual_seed(0)
    half = params // 2
    tvs = [{"a.weight": torch.randn(half // 1000, 1000, generator=g),
            "b.weight": torch.randn(params - half, generator=g)} for _ in range(clients)]
    fisher = [{k: v.abs() for k, v in tv.items()} for tv in tvs]
    theta0 = {k: torch.randn(v.shape, generator=g) for k, v in tvs[0].items()}
    rows = []
    for method in METHODS:
        extras = {"fisher": fisher} if method == "fisher" else None
        kw = {**PARAMS.get(method, {}),
              **({"theta0": theta0} if get_method(method).needs.theta0 else {})}
        row: dict = {"part": "aggregation", "method": method, "params": params, "clients": clients,
                     "method_params": PARAMS.get(method, {})}
        for i, device in enumerate(devices):
            row[f"seconds_{i}"] = best_seconds(
                lambda d=device: merge(method, tvs, extras=extras, device=d, **kw), device)
        row["ratio"] = row["seconds_0"] / row["seconds_1"]
        rows.append(row)
    return rows


def chunked(devices: list[str], params: int, chunk_mib: float, out: Path, clients: int = 4) -> list[dict]:
    """A large-model round's merge on each device: the task vectors written to disk and read
    back memory-mapped (fl_merge.io.spill), each method merged group by group
    (fl_merge.round.group_merge.merge_in_groups) with each group's Delta written to disk;
    seconds per device (one run after a warm-up), the ratio and max |Delta_0 - Delta_1|."""
    import torch

    from fl_merge.io.spill import SpillDir
    from fl_merge.methods import merge
    from fl_merge.round.chunks import chunk_limit
    from fl_merge.round.group_merge import merge_in_groups

    g = torch.Generator().manual_seed(1)
    side = min(1024, math.isqrt(max(params // 4, 1)))  # 1024 x 1024 layers; at least 4 groups' worth
    layers = max(1, params // (side * side))
    store = SpillDir(out)
    try:
        tvs = [store.write(f"tau-{i}", {f"layer{j}.weight": torch.randn(side, side, generator=g)
                                        for j in range(layers)}) for i in range(clients)]
        rows = []
        for method in CHUNKED_METHODS:
            kw = CHUNKED_PARAMS.get(method, {})
            row: dict = {"part": "chunked", "method": method, "params": layers * side * side,
                         "clients": clients, "chunk_mib": chunk_mib, "method_params": kw}
            results = []
            for i, device in enumerate(devices):
                def run(d=device):
                    return merge_in_groups(lambda t, e, b: merge(method, t, device=d, **kw), tvs, None, None,
                                           chunk_limit(chunk_mib), store, f"{method}-{i}")
                row[f"seconds_{i}"] = best_seconds(run, device, repeat=1)  # each run writes its Delta
                results.append(run())
            row["ratio"] = row["seconds_0"] / row["seconds_1"]
            row["max_abs_diff"] = max(float((results[0][k] - results[1][k]).abs().max()) for k in results[0])
            rows.append(row)
        return rows
    finally:
        store.cleanup()


def minilm(devices: list[str], steps: dict[str, int]) -> list[dict]:
    """MiniLM-L6 (+ a 5-class head) fine-tuning steps per second on each device."""
    import torch

    from fl_merge.data.offline import encode_texts
    from fl_merge.models.registry import build_model

    rows = []
    row: dict = {"part": "minilm", "batch": 32, "tokens": 64}
    for i, device in enumerate(devices):
        torch.manual_seed(0)
        model = build_model("minilm-l6", 5).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        # our text models read UTF-8 bytes and tokenise inside forward (fl_merge.data.offline)
        x = encode_texts([" ".join(f"word{(j * 7 + t) % 500}" for t in range(80)) for j in range(32)])
        y = torch.randint(0, 5, (32,), device=device)

        def step() -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        n = steps["cuda" if device.startswith("cuda") else "cpu"]
        step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        _sync(device)
        row[f"steps_per_s_{i}"] = n / (time.perf_counter() - t0)
    row["ratio"] = row["steps_per_s_1"] / row["steps_per_s_0"]
    rows.append(row)
    return rows


def vision8(out: Path, local_steps: int, client_gpus: float) -> list[dict]:
    """One vision8 run on cuda with a GPU share per simulated client."""
    from fl_merge.config.run_config import RunConfig
    from fl_merge.engine.run import run

    cfg = RunConfig.from_flower({
        "model": "efficientnet-lite0", "suite": "mnist8", "num-clients": 8,
        "local-steps": str(local_steps), "lr": "0.0005", "batch-size": "64",
        "lambdas": "0.01,0.02,0.05,0.1,0.2,0.3,0.5,1", "method": "task_arithmetic,ties",
        "device": "cuda", "cache": False, "output-dir": str(out / "vision8")})
    t0 = time.perf_counter()
    outcome = run(cfg, client_gpus=client_gpus, stream=False, progress=False)
    wall = time.perf_counter() - t0
    rows = []
    for label, choice in outcome.meta.get("methods", {}).items():
        rows.append({"part": "vision8", "method": label, "lambda": choice.get("lambda"),
                     "eta": choice.get("eta"), "wall_s": wall, "local_steps": local_steps,
                     "client_gpus": client_gpus})
    for r in outcome.meta.get("comparison", []):
        for row in rows:
            if row["method"] == r.get("model"):
                row["test_accuracy"] = r.get("accuracy")
    return rows or [{"part": "vision8", "wall_s": wall}]


def report(rows: list[dict], devices: list[str]) -> str:
    """The short markdown report."""
    a, b = devices
    lines = [f"# GPU check ({a} against {b})", ""]
    agg = [r for r in rows if r["part"] == "aggregation"]
    if agg:
        lines += [f"Aggregation, K={agg[0]['clients']}, {agg[0]['params']:,} parameters, best of 3:", "",
                  f"| method | {a} s | {b} s | {a}/{b} |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['seconds_0']:.3f} | {r['seconds_1']:.4f} | {r['ratio']:.1f}x |"
                  for r in agg]
        lines.append("")
    big = [r for r in rows if r["part"] == "chunked"]
    if big:
        lines += [f"A large-model round's merge, group by group from memory-mapped task vectors, "
                  f"K={big[0]['clients']}, {big[0]['params']:,} parameters, {big[0]['chunk_mib']:g} MiB "
                  "groups, after one warm-up run:", "",
                  f"| method | {a} s | {b} s | {a}/{b} | max abs diff |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['seconds_0']:.3f} | {r['seconds_1']:.4f} | {r['ratio']:.1f}x | "
                  f"{r['max_abs_diff']:.2e} |" for r in big]
        lines.append("")
    for r in (r for r in rows if r["part"] == "minilm"):
        lines += [f"MiniLM-L6 training, batch {r['batch']} x {r['tokens']} tokens: "
                  f"{r['steps_per_s_0']:.2f} steps/s on {a}, {r['steps_per_s_1']:.2f} on {b} "
                  f"({r['ratio']:.1f}x).", ""]
    for r in (r for r in rows if r["part"] == "vision8"):
        lines.append(f"vision8 on {b}: {r.get('method', '-')} lambda {r.get('lambda')} "
                     f"(eta {r.get('eta')}), test {r.get('test_accuracy')}, "
                     f"run wall {r['wall_s']:.0f} s ({r.get('local_steps')} steps, "
                     f"{r.get('client_gpus')} GPU per client).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--devices", default="cpu,cuda", help="the two devices compared (first/second)")
    ap.add_argument("--params", type=int, default=20_000_000)
    ap.add_argument("--chunked-params", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--chunk-mib", type=float, default=16.0)
    ap.add_argument("--minilm-steps", default="cpu=5,cuda=50")
    ap.add_argument("--vision8-steps", type=int, default=200)
    ap.add_argument("--client-gpus", type=float, default=0.25)
    args = ap.parse_args(argv)
    devices = args.devices.split(",")
    parts = args.parts.split(",")
    bad = [p for p in parts if p not in PARTS]
    if len(devices) != 2 or bad:
        print(f"gpu_check: --devices needs two devices (got {args.devices!r}) and --parts only "
              f"{', '.join(PARTS)} (got {', '.join(bad) or args.parts})", file=sys.stderr)
        return 2
    if "vision8" in parts and not devices[1].startswith("cuda"):
        print("gpu_check: the vision8 part runs on cuda only; leave it out of --parts", file=sys.stderr)
        return 2
    try:
        check_devices(devices)
    except NoGPU as e:
        print(e, file=sys.stderr)
        return 2
    steps = {k: int(v) for k, v in (kv.split("=") for kv in args.minilm_steps.split(","))}
    out = Path(args.out)
    rows: list[dict] = []
    if "aggregation" in parts:
        rows += aggregation(devices, args.params)
    if "chunked" in parts:
        rows += chunked(devices, args.chunked_params, args.chunk_mib, out)
    if "minilm" in parts:
        rows += minilm(devices, steps)
    if "vision8" in parts:
        rows += vision8(out, args.vision8_steps, args.client_gpus)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = report(rows, devices)
    (out / "gpu_check.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
