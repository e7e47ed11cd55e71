"""Benchmark: a one-shot merge of a >= 200 MB backbone through Flower's deployment engine on
loopback (insecure SuperLink + 2 SuperNodes as processes), with wall time and the peak RSS of
the SuperLink process tree (it runs the ServerApp in a subprocess) and of each SuperNode tree.

    python benchmarks/deployment_large.py [--model wide-mlp --local-steps 5]

Memory is sampled from /proc every 0.2 s (Linux). This is a script, not a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (MB)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        stack += children.get(p, [])
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wide-mlp")
    parser.add_argument("--local-steps", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fl-merge-deploy-large-"))
    port = _free_port()
    home = work / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FL_MERGE_CACHE": str(work / "cache"), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Pretrain theta0 first so the measured run does not include it.
    from fl_merge.models import PretrainConfig, pretrained_backbone

    os.environ["FL_MERGE_CACHE"] = env["FL_MERGE_CACHE"]
    t0 = time.perf_counter()
    theta0 = pretrained_backbone(args.model, PretrainConfig(), progress=False)
    size_mb = sum(v.numel() * v.element_size() for v in theta0.values()) / 2**20
    print(f"{args.model}: backbone {size_mb:.0f} MB, pretrained in {time.perf_counter() - t0:.0f} s")
    procs: dict[str, subprocess.Popen] = {}
    peaks: dict[str, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for name, p in procs.items():
                peaks[name] = max(peaks.get(name, 0.0), _tree_rss_mb(p.pid))
            time.sleep(0.2)

    def start(name: str, cmd: list[str]) -> None:
        log = open(work / f"{name}.log", "w")  # noqa: SIM115  (lives as long as the process)
        procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess",
                            "--host", "127.0.0.1", "--port", str(port), "--database", str(work / "state.db")])
        time.sleep(8)
        for i in (0, 1):
            start(f"supernode{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{port}", "--node-config", f"partition-id={i} num-partitions=2",
                                    "--port", str(_free_port())])
        threading.Thread(target=sample, daemon=True).start()
        out = work / "out"
        items = (f'num-clients=2 model="{args.model}" local-steps="{args.local_steps}" etas="1" '
                 f'output-dir="{out}" cache=false')
        t0 = time.perf_counter()
        proc = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream",
                               "--run-config", items], env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        ok = (out / "merged.safetensors").exists()
    finally:
        stop.set()
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if not ok:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"the run failed; logs in {work}")
    print(f"flwr run (2 clients, {args.local_steps} local steps, train + merge + evaluate): {seconds:.0f} s")
    for name, mb in peaks.items():
        print(f"  peak RSS {name:10s} {mb:7.0f} MB  ({mb / size_mb:.1f}x the backbone)")
    print(f"  merged.safetensors {(out / 'merged.safetensors').stat().st_size / 2**20:.0f} MB; logs in {work}")


if __name__ == "__main__":
    main()
