"""Benchmark: the SuperLink's on-disk state (`flower-superlink --database FILE`) under N
SuperNodes: the documented insecure recipe on loopback (a SuperLink with --database on a
temporary file, N SuperNodes, `flwr run` with num-clients=N), optionally with the machine
loaded by --load busy processes. Prints whether the run finished, its wall time, and how
many times the SuperLink logged sqlite's "database is locked" (each one a 500 on the API
call that hit it).

    python benchmarks/sqlite_state.py --clients 8 [--load 4] [--busy-timeout 60]
        [--run-config 'local-steps="20"']

Run it under `flock /tmp/flower.lock` on a shared machine. This is a script, not a test:
it starts N+1 Flower processes and N ClientApps (about 0.6 GB each while they train).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCKED = "database is locked"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _busy() -> None:  # one core's worth of load
    while True:
        pass


def _stop(procs: list[subprocess.Popen]) -> None:
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass


def run(clients: int, load: int, run_config: str, work: Path, timeout: float, busy_timeout: float | None) -> dict:
    port = _free_port()
    home = work / "flwr-home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], log: str) -> None:
        with open(work / log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))

    burners = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(load)]
    for b in burners:
        b.start()
    t0 = time.monotonic()
    try:
        link = ([str(BIN / "fl-merge-superlink"), "--sqlite-busy-timeout", str(busy_timeout)] if busy_timeout
                else [str(BIN / "flower-superlink")])
        start([*link, "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
               "--port", str(port), "--database", str(work / "state.db")], "superlink.log")
        deadline = time.monotonic() + 120
        while not _listening(port):
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise SystemExit("the SuperLink did not start: " + (work / "superlink.log").read_text()[-2000:])
            time.sleep(0.3)
        for i in range(clients):
            start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                   "--port", str(_free_port()), "--node-config",
                   f'partition-id={i} num-partitions={clients} cache-dir="{work / f"node{i}"}"'], f"node{i}.log")
        out = work / "out"
        items = f'num-clients={clients} cache=false output-dir="{out}" {run_config}'.strip()
        flwr = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream", "--run-config", items],
                              env=env, capture_output=True, text=True, timeout=timeout, check=False)
        (work / "run.log").write_text(flwr.stdout + flwr.stderr)
    finally:
        _stop(procs)
        for b in burners:
            b.terminate()
    link_log = (work / "superlink.log").read_text(errors="replace")
    return {"clients": clients, "load": load, "busy_timeout": busy_timeout or 5, "finished": (out / "run.json").exists(),
            "seconds": round(time.monotonic() - t0), "locked": link_log.count(LOCKED), "work": str(work)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="SuperNodes (one client each)")
    parser.add_argument("--load", type=int, default=0, help="busy processes started beside the run")
    parser.add_argument("--run-config", default='local-steps="20" etas="1" search="off"',
                        help="extra run-config items (TOML-quoted)")
    parser.add_argument("--busy-timeout", type=float, default=None,
                        help="start the SuperLink by fl-merge-superlink --sqlite-busy-timeout with this (s)")
    parser.add_argument("--timeout", type=float, default=540, help="seconds `flwr run` may take")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.load < 0:
        parser.error("--clients must be >= 1 and --load >= 0")
    work = Path(tempfile.mkdtemp(prefix="fl-merge-sqlite-"))
    result = run(args.clients, args.load, args.run_config, work, args.timeout, args.busy_timeout)
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0 if result["finished"] and not result["locked"] else 1


if __name__ == "__main__":
    sys.exit(main())
