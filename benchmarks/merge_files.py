"""Benchmark `fl-merge merge` on large checkpoints: peak memory and time against reading once.

Writes K+1 synthetic fp16 checkpoints of --size-gb each into a temporary folder (deleted at
the end), then, each in its own child process (peak RSS from os.wait4's rusage, wall time
around the child):

* read: every tensor of the K+1 files read once with safe_open + get_tensor and dropped;
* merge: `python -m fl_merge.cli.merge --base ... --models ... --method M --lambda 0.3`.

and prints both with the ratios. Targets (issue 15): merge peak RSS <= 1.5 GB and merge wall
time <= 2x reading. Usage:

    PYTHONPATH=$PWD python benchmarks/merge_files.py [--k 4] [--size-gb 1.0] [--method task_arithmetic]
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


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a child process. A child's ru_maxrss starts from
    the parent's resident set at fork, so the parent never imports torch nor holds data."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--method", nargs="+", default=["task_arithmetic"], help="one merge each")
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
        py = sys.executable
        subprocess.run(["sync"], check=False)
        warm(paths)
        start_t, _ = measure([py, "-c", "import fl_merge.cli.merge"])  # interpreter + torch import
        read_t, read_rss = measure([py, "-c", READ, *paths])
        so_t, so_rss = measure([py, "-c", READ_SAFE_OPEN, *paths])
        print(f"load: {os.getloadavg()}")
        print(f"start-up alone (python + import torch, fl_merge): {start_t:7.2f} s")
        print(f"read K+1 files once (Checkpoint.get): {read_t:7.2f} s   peak RSS {read_rss:5.2f} GB")
        print(f"read once, safe_open + get_tensor + sum: {so_t:7.2f} s   peak RSS {so_rss:5.2f} GB")
        for method in args.method:
            out = tmp / "merged.safetensors"
            merge_t, merge_rss = measure([py, "-m", "fl_merge.cli.merge", "--base", paths[0],
                                          "--models", *paths[1:], "--method", method,
                                          "--lambda", "0.3", "--out", str(out)])
            out_gb = sum(f.stat().st_size for f in tmp.glob("merged*")) / 1e9
            for f in tmp.glob("merged*"):
                f.unlink()
            print(f"merge ({method}): {merge_t:7.2f} s   peak RSS {merge_rss:5.2f} GB   "
                  f"(output {out_gb:.2f} GB)")
            print(f"  ratios: time merge/read {merge_t / read_t:.2f} (target <= 2; vs safe_open "
                  f"{merge_t / so_t:.2f}; net of start-up "
                  f"{(merge_t - start_t) / max(read_t - start_t, 1e-9):.2f}), "
                  f"peak RSS {merge_rss:.2f} GB (target <= 1.5)")
        print(f"load: {os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
