"""Benchmark: a one-shot merge of a large backbone through Flower's deployment engine on
loopback (insecure SuperLink + K SuperNodes as processes), with wall time and a memory
breakdown: the resident memory of every process (SuperLink, flwr-serverapp, each SuperNode
and its flwr-clientapp, Flower's superexec helpers) sampled over time with psutil, and the
peak of each in every phase of the round (the ServerApp logs "fl-merge phase <name> starts
<seconds> s into the round" when a phase starts; fl_merge/round/clock.py).

    python benchmarks/deployment_large.py [--model wide-mlp --clients 2 --local-steps 5
        --database memory --run-config "spill=true measure-heterogeneity=false"]

RSS counts file-backed pages too (a memory-mapped spill file's pages are resident after they
are read, but the kernel can drop them); `anon` is RSS minus shared/file pages, the part
that cannot be reclaimed. Ratios are to the backbone's float32 size. A watchdog kills every
process the benchmark started when their summed RSS passes --limit-gib (default 14).
This is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from fl_merge.round.clock import PHASE_PATTERN

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# command-line fragments -> role (first match wins; the SuperExec helpers are Flower's)
ROLES = (("flwr-serverapp", "serverapp"), ("flwr-clientapp", "clientapp"),
         ("superexec", "superexec"), ("flower-superlink", "superlink"),
         ("flower-supernode", "supernode"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def role_of(cmdline: list[str]) -> str:
    """The Flower role of a process from its command line ('other' when none matches)."""
    text = " ".join(cmdline)
    return next((role for frag, role in ROLES if frag in text), "other")


def sample_tree(pid: int) -> dict[str, tuple[float, float]]:
    """role -> (rss MB, anon MB) summed over `pid`'s process tree."""
    out: dict[str, tuple[float, float]] = {}
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            mi, role = p.memory_info(), role_of(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss, anon = out.get(role, (0.0, 0.0))
        out[role] = (rss + mi.rss / 2**20, anon + (mi.rss - mi.shared) / 2**20)
    return out


def wall_marks(seen: list[tuple[float, str, float]]) -> list[tuple[float, str]]:
    """(wall time the line was read, phase, seconds into the round) per phase marker ->
    (wall time the phase started, phase), sorted. A line is read some time after it is
    logged (Flower streams the logs), never before: the round's start is taken as the
    earliest `read - seconds into the round` of all the markers, the one read with the
    least delay."""
    if not seen:
        return []
    start = min(read - elapsed for read, _, elapsed in seen)
    return sorted((start + elapsed, name) for _, name, elapsed in seen)


def phase_at(t: float, marks: list[tuple[float, str]]) -> str:
    """The phase running at time t (marks sorted by time; 'start' before the first)."""
    name = "start"
    for when, phase in marks:
        if when > t:
            break
        name = phase
    return name


def phase_peaks(samples: list[tuple[float, str, str, float, float]], marks: list[tuple[float, str]]
                ) -> dict[str, dict[str, tuple[float, float]]]:
    """(time, group, role, rss, anon) samples -> phase -> "group/role" -> peak (rss, anon);
    samples of one time and group are also summed into "group/total"."""
    peaks: dict[str, dict[str, tuple[float, float]]] = {}
    totals: dict[tuple[float, str], tuple[float, float]] = {}
    for t, group, role, rss, anon in samples:
        tr, ta = totals.get((t, group), (0.0, 0.0))
        totals[(t, group)] = (tr + rss, ta + anon)
    rows = [(t, f"{g}/{r}", rss, anon) for t, g, r, rss, anon in samples]
    rows += [(t, f"{g}/total", rss, anon) for (t, g), (rss, anon) in totals.items()]
    for t, name, rss, anon in rows:
        for phase in (phase_at(t, marks), "whole run"):
            old = peaks.setdefault(phase, {}).get(name, (0.0, 0.0))
            peaks[phase][name] = (max(old[0], rss), max(old[1], anon))
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wide-mlp")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--limit-gib", type=float, default=14.0, help="watchdog: summed RSS limit")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--run-config", default="", help="extra run-config items (TOML-quoted)")
    parser.add_argument("--database", choices=("sqlite", "memory"), default="sqlite",
                        help="the SuperLink's state: a sqlite file (--database) or Flower's in-memory store")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="MALLOC_MMAP_THRESHOLD_ for every process (bytes; 0: glibc's default): "
                             "larger blocks are mmap'ed and go back to the system when freed")
    parser.add_argument("--json", type=Path, help="write the samples, marks and peaks here")
    args = parser.parse_args()
    k = args.clients
    work = Path(tempfile.mkdtemp(prefix="fl-merge-deploy-large-"))
    port = _free_port()
    home = work / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FL_MERGE_CACHE": os.environ.get("FL_MERGE_CACHE", str(work / "cache")),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           **({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {})}
    # Pretrain theta0 first (in a child: this process stays small) so the run does not include it.
    t0 = time.perf_counter()
    size_mb = float(subprocess.run(
        [sys.executable, "-c", "import sys; from fl_merge.models.registry import PretrainConfig, pretrained_backbone; "
         f"s = pretrained_backbone('{args.model}', PretrainConfig(), progress=False); "
         "print(sum(v.numel() * v.element_size() for v in s.values()) / 2**20)"],
        env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
    print(f"{args.model}: backbone {size_mb:.0f} MB, theta0 ready in {time.perf_counter() - t0:.0f} s")
    procs: dict[str, subprocess.Popen] = {}
    samples: list[tuple[float, str, str, float, float]] = []
    marks: list[tuple[float, str]] = []
    seen: list[tuple[float, str, float]] = []  # (read at, phase, seconds into the round)
    stop, killed = threading.Event(), threading.Event()

    def kill_all() -> None:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def sample() -> None:
        while not stop.is_set():
            t, total = time.time(), 0.0
            for group, p in list(procs.items()):
                for role, (rss, anon) in sample_tree(p.pid).items():
                    samples.append((t, group, role, rss, anon))
                    total += rss
            if total > args.limit_gib * 1024:
                print(f"WATCHDOG: summed RSS {total / 1024:.1f} GiB > {args.limit_gib} GiB: killing the run")
                killed.set()
                kill_all()
                return
            time.sleep(args.interval)

    def start(name: str, cmd: list[str]) -> None:
        log = open(work / f"{name}.log", "w")  # noqa: SIM115  (lives as long as the process)
        procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    out = work / "out"
    ok, lines, seconds = False, [], 0.0
    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess",
                            "--host", "127.0.0.1", "--port", str(port),
                            *(["--database", str(work / "state.db")] if args.database == "sqlite" else [])])
        time.sleep(8)
        for i in range(k):
            start(f"supernode{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{port}", "--node-config", f"partition-id={i} num-partitions={k}",
                                    "--port", str(_free_port())])
        threading.Thread(target=sample, daemon=True).start()
        items = (f'num-clients={k} model="{args.model}" local-steps="{args.local_steps}" etas="1" '
                 f'output-dir="{out}" cache=false {args.run_config}')
        t0 = time.perf_counter()
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream", "--run-config",
                                items], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        procs["flwr-run"] = run
        for line in run.stdout:
            lines.append(line)
            if m := PHASE_PATTERN.search(line):
                seen.append((time.time(), m.group(1), float(m.group(2))))
        run.wait()
        seconds = time.perf_counter() - t0
        ok = (out / "merged.safetensors").exists() and not killed.is_set()
    finally:
        stop.set()
        kill_all()
        marks += wall_marks(seen)
    if not ok:  # the breakdown up to the failure is still printed (and saved) below
        sys.stderr.write("".join(lines)[-3000:])
        print(f"THE RUN FAILED{' (watchdog)' if killed.is_set() else ''}; logs in {work}")
    else:
        print(f"flwr run ({k} clients, {args.local_steps} local steps, train + merge + evaluate): "
              f"{seconds:.0f} s")
    marks.sort()
    peaks = phase_peaks(samples, marks)
    names = sorted({n for p in peaks.values() for n in p})
    phases = [p for _, p in marks if p in peaks]
    phases = ["start", *dict.fromkeys(phases), "whole run"]
    print(f"peak RSS per process and phase, in backbones ({size_mb:.0f} MB); anon in brackets")
    print(f"{'process':24s}" + "".join(f"{p[:14]:>16s}" for p in phases))
    for n in names:
        cells = []
        for p in phases:
            rss, anon = peaks.get(p, {}).get(n, (0.0, 0.0))
            cells.append(f"{rss / size_mb:6.1f} [{anon / size_mb:5.1f}]" if rss else f"{'-':>14s}")
        print(f"{n:24s}" + "".join(f"{c:>16s}" for c in cells))
    server = peaks["whole run"].get("superlink/total", (0.0, 0.0))[0]
    print(f"SuperLink + ServerApp peak: {server:.0f} MB ({server / size_mb:.1f}x); target <= 3x")
    for i in range(k):
        mb = peaks["whole run"].get(f"supernode{i}/total", (0.0, 0.0))[0]
        print(f"SuperNode {i} tree peak: {mb:.0f} MB ({mb / size_mb:.1f}x); target <= 4x")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "clients": k, "backbone_mb": size_mb,
                                         "ok": ok, "seconds": seconds, "marks": marks,
                                         "samples": samples, "peaks": peaks}))
    if not ok:
        raise SystemExit(1)
    print(f"merged.safetensors {(out / 'merged.safetensors').stat().st_size / 2**20:.0f} MB; logs in {work}")


if __name__ == "__main__":
    main()
