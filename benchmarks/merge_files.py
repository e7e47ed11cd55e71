"""Benchmark `fl-merge merge` on large checkpoints, side by side with mergekit on the same files.

Writes K+1 synthetic fp16 checkpoints of --size-gb each into a temporary folder (deleted at
the end), then, each in its own child process (peak RSS from os.wait4's rusage, wall time
around the child):

* read: every tensor of the K+1 files read once (fl-merge's reader; safe_open + get_tensor);
* per method: `python -m fl_merge.cli.merge --base ... --models ... --method M --lambda 0.3`
  and mergekit's `mergekit-pytorch CONFIG OUT` on the same files, computing the same model;
  then a third child reads both outputs and prints max |fl-merge - mergekit| over tensors.

and prints times, peak RSS and the ratios fl-merge/mergekit. Targets (issue 28 item 5): merge
peak RSS <= 1.5 GB and wall time no more than mergekit's. Usage:

    PYTHONPATH=$PWD python benchmarks/merge_files.py [--k 4] [--size-gb 1.0] [--method task_arithmetic ties]

The mergekit side (mergekit 0.1.5, the dev extra):
* entry point: `mergekit-pytorch`, mergekit's merge of raw checkpoints (what
  tests/methods/test_mergekit_parity.py runs). It takes each model as the path of its
  .safetensors file, so both tools read the very same files; no folder or config.json is
  needed (`mergekit-yaml` would need Hugging Face folders with a config.json of an
  architecture mergekit knows, which these synthetic tensors are not);
* its options at their defaults, as a user runs it (`--device cpu`, no `--low-cpu-memory`
  (it keeps tensors on the accelerator, a GPU option), no `--lazy-unpickle` (pickles only),
  no `--async-write`, one output shard up to `--out-shard-size 5B`, `--clone-tensors` off),
  plus `--quiet` (no progress bars). mergekit reads with safetensors' safe_open (memory-
  mapped) and holds each output shard in memory until the shard is written;
* `dtype: float32`, `out_dtype: float16`: fl-merge computes in float32 and writes the base's
  dtype (fp16 here); mergekit without `dtype` would compute in fp16, another model;
* the same method at the same lambda: mergekit's `lambda` is fl-merge's --lambda; its
  per-model `weight` is K p_i = 1 for task_arithmetic (fl-merge's eta = K lambda on the mean
  of the task vectors: theta0 + lambda sum_i tau_i, mergekit's normalize: false sum) and
  p_i = 1/K for ties (normalize: true divides by the agreeing weights, as fl-merge's mean);
  ties at density 0.2 with fl-merge's `--param convention=mergekit` (each tensor trimmed
  alone to exactly k entries, an exact-0 vote elects +: mergekit's rules,
  fl_merge/merging/conventions.py). Both compute the same Delta; they differ in rounding
  only, by at most 1 fp16 ulp on a fraction of the entries: Task Arithmetic sums the same
  terms in another order, and both methods add lambda * Delta to theta0 in one rounding
  (torch's add with alpha) where mergekit rounds lambda * Delta first (measured: the
  TIES Deltas are bit-identical before that step).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Reading once "the same way" as the merge reads (fl_merge.io.checkpoints.Checkpoint: positioned
# reads, one whole tensor at a time), and with safetensors' own safe_open + get_tensor.
READ = """
import sys
from fl_merge.io.checkpoints import Checkpoint
for path in sys.argv[1:]:
    with Checkpoint(path) as ck:
        for k in ck.keys:
            t = ck.get(k)
            del t
"""
READ_SAFE_OPEN = """
import sys
from safetensors import safe_open
for path in sys.argv[1:]:
    with safe_open(path, "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            t.sum()  # touch the data (get_tensor may map it without reading)
            del t
"""
# Both outputs read tensor by tensor: max |fl-merge - mergekit| and how many entries differ.
COMPARE = """
import sys
from fl_merge.io.checkpoints import Checkpoint
ours, theirs = Checkpoint(sys.argv[1], "fl-merge"), Checkpoint(sys.argv[2], "mergekit")
assert sorted(ours.keys) == sorted(theirs.keys), "the outputs hold other tensors"
worst, differ, total, same = 0.0, 0, 0, 0
for k in ours.keys:
    a, b = ours.get(k), theirs.get(k)
    assert a.dtype == b.dtype and a.shape == b.shape, k
    d = (a.double() - b.double()).abs()
    worst, differ, total = max(worst, float(d.max()) if d.numel() else 0.0), differ + int((d > 0).sum()), total + d.numel()
    same += int(bool((d == 0).all()))
print(f"{worst:.3g} {differ} {total} {same} {len(ours.keys)}")
"""
LAMBDA = 0.3
# fl-merge --param values and mergekit's merge_method, global parameters and per-model weight
# (as a function of K) that compute the same model (the module docstring says why).
METHODS = {
    "task_arithmetic": ([], "task_arithmetic", {}, lambda k: 1.0),
    "ties": (["convention=mergekit", "density=0.2"], "ties", {"density": 0.2}, lambda k: 1.0 / k),
}


def mergekit_config(method: str, base: str, models: list[str]) -> dict:
    """mergekit-pytorch's YAML config (as a dict) for `method` at lambda LAMBDA."""
    _, mk_method, mk_params, weight = METHODS[method]
    return {"merge_method": mk_method, "base_model": base,
            "models": [{"model": m, "parameters": {"weight": weight(len(models))}} for m in models],
            "parameters": {**mk_params, "lambda": LAMBDA}, "dtype": "float32", "out_dtype": "float16"}


def write_checkpoints(folder: Path, k: int, size_gb: float, seed: int = 0) -> list[str]:
    """K+1 fp16 checkpoints (base first) of about `size_gb` GB: 4096x4096 matrices (32 MiB
    each, so the largest tensor is 32 MiB), a few biases and an int buffer."""
    import torch  # only in the writer child: the parent stays small (see measure)
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    n_mats = max(1, round(size_gb * 1e9 / (4096 * 4096 * 2)))
    paths = []
    for i in range(k + 1):
        sd = {}
        for j in range(n_mats):
            sd[f"layers.{j}.weight"] = torch.randn(4096, 4096, generator=g, dtype=torch.float32).half()
            sd[f"layers.{j}.bias"] = torch.randn(4096, generator=g).half()
        sd["bn.num_batches_tracked"] = torch.tensor(100)
        p = folder / ("base.safetensors" if i == 0 else f"model{i}.safetensors")
        save_file(sd, str(p))
        del sd
        paths.append(str(p))
    return paths


def warm(paths: list[str]) -> None:
    """Read every file once untimed, so each measurement starts from the page cache (the
    first reader after writing otherwise also pays the write-back of the new files)."""
    buf = bytearray(1 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in GB, CPU seconds: user + system) of a child process. On a
    shared machine the wall time follows the load; the CPU seconds much less so (they
    count every thread's work, including spin-waiting ones). A child's ru_maxrss starts from
    the parent's resident set at fork, so the parent never imports torch nor holds data.
    The child's stderr (mergekit's progress bars) is kept aside and shown if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
            raise SystemExit(f"{cmd[:4]} failed with exit code {proc.returncode}: " + "\n".join(tail))
    return wall, usage.ru_maxrss * 1024 / 1e9, usage.ru_utime + usage.ru_stime  # maxrss: KiB


def compare_outputs(ours: Path, theirs: Path) -> str:
    """'max |diff| D, N of M entries differ (T of U tensors bit-identical)', from a child."""
    res = subprocess.run([sys.executable, "-c", COMPARE, str(ours), str(theirs)], check=True,
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    worst, differ, total, same, n = res.stdout.split()
    return (f"max |fl-merge - mergekit| {float(worst):.3g}, {int(differ):,} of {int(total):,} "
            f"entries differ ({same} of {n} tensors bit-identical)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--method", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="one merge each, by both tools")
    ap.add_argument("--dir", default=None, help="parent of the temporary folder")
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)  # the writer child
    args = ap.parse_args()
    if args.write is not None:
        write_checkpoints(Path(args.write), args.k, args.size_gb)
        return
    tmp = Path(tempfile.mkdtemp(prefix="merge_bench_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write", str(tmp), "--k", str(args.k),
                        "--size-gb", str(args.size_gb)], check=True)
        paths = [str(tmp / "base.safetensors")] + [str(tmp / f"model{i}.safetensors")
                                                   for i in range(1, args.k + 1)]
        sizes = [os.path.getsize(p) / 1e9 for p in paths]
        print(f"wrote {len(paths)} checkpoints of {min(sizes):.2f}-{max(sizes):.2f} GB "
              f"in {time.perf_counter() - t0:.0f} s")
        py, mergekit = sys.executable, str(Path(sys.executable).parent / "mergekit-pytorch")
        subprocess.run(["sync"], check=False)
        warm(paths)
        start_t, _, _ = measure([py, "-c", "import fl_merge.cli.merge"])  # interpreter + torch import
        mk_start_t, _, _ = measure([py, "-c", "import mergekit.scripts.merge_raw_pytorch"])
        read_t, read_rss, _ = measure([py, "-c", READ, *paths])
        so_t, so_rss, _ = measure([py, "-c", READ_SAFE_OPEN, *paths])
        print(f"load: {os.getloadavg()}; {os.cpu_count()} cores")
        print(f"start-up alone (python + imports): fl-merge {start_t:5.2f} s, mergekit {mk_start_t:5.2f} s")
        print(f"read K+1 files once (Checkpoint.get): {read_t:7.2f} s   peak RSS {read_rss:5.2f} GB")
        print(f"read once, safe_open + get_tensor + sum: {so_t:7.2f} s   peak RSS {so_rss:5.2f} GB")
        for method in args.method:
            ours, theirs = tmp / "merged.safetensors", tmp / "mergekit_out"
            params = METHODS[method][0]
            load = os.getloadavg()[0]
            merge_t, merge_rss, merge_cpu = measure([py, "-m", "fl_merge.cli.merge", "--base", paths[0],
                                          "--models", *paths[1:], "--method", method,
                                          *(["--param", *params] if params else []),
                                          "--lambda", str(LAMBDA), "--out", str(ours)])
            config = tmp / f"mergekit_{method}.yaml"
            config.write_text(yaml.safe_dump(mergekit_config(method, paths[0], paths[1:])))
            mk_t, mk_rss, mk_cpu = measure([mergekit, str(config), str(theirs), "--quiet"])
            agree = compare_outputs(ours, theirs)
            for f in tmp.glob("merged*"):
                f.unlink()
            shutil.rmtree(theirs)
            print(f"{method} (fl-merge {' '.join(params) or 'defaults'}; lambda {LAMBDA}; load "
                  f"{load:.1f} before the pair, {os.getloadavg()[0]:.1f} after):")
            print(f"  fl-merge merge:   {merge_t:7.2f} s   peak RSS {merge_rss:5.2f} GB   CPU {merge_cpu:7.2f} s")
            print(f"  mergekit-pytorch: {mk_t:7.2f} s   peak RSS {mk_rss:5.2f} GB   CPU {mk_cpu:7.2f} s")
            print(f"  fl-merge/mergekit: time {merge_t / mk_t:.2f} (target <= 1), peak RSS "
                  f"{merge_rss / mk_rss:.2f} (fl-merge's target <= 1.5 GB); CPU {merge_cpu / mk_cpu:.2f}; "
                  f"time merge/read "
                  f"{merge_t / read_t:.2f}")
            print(f"  {agree}")
        print(f"load: {os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
