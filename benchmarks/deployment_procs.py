"""A Flower deployment on loopback for the memory benchmarks: one insecure SuperLink and K
SuperNodes as processes (each in its own process group), every process's RSS sampled by role
(benchmarks/deployment_large.py: `sample_tree`, `role_of`), each group's idle RSS taken
before a run is submitted, `flwr run` of an app folder with its log streamed (phase markers
parsed), and a watchdog that kills every process the deployment started when their summed
RSS passes a limit. Used by benchmarks/deployment_1gb.py. This is a benchmark helper, not a
test.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from deployment_large import BIN, _free_port, sample_tree, wall_marks
from fl_merge.round.clock import PHASE_PATTERN

Sample = tuple[float, str, str, float, float]  # (time, group, role, rss MB, anon MB)
STEP_MARK = "fl-merge chunks:"  # the ServerApp's line as each wave of group messages is sent


def median_idle(samples: list[Sample], group: str) -> dict[str, float]:
    """role -> median RSS (MB) of `group`'s idle samples; a role seen in only some samples
    counts 0 in the others (the median of each sample time's value)."""
    times = sorted({t for t, g, *_ in samples if g == group})
    roles = sorted({r for _, g, r, *_ in samples if g == group})
    table = {(t, r): rss for t, g, r, rss, _ in samples if g == group}
    return {r: statistics.median(table.get((t, r), 0.0) for t in times) for r in roles}


def settled(before: dict[str, dict[str, float]] | None, now: dict[str, dict[str, float]],
            tolerance_mb: float) -> bool:
    """Every group's summed idle RSS within `tolerance_mb` of the previous window's, and the
    same roles present (a process that appeared or left: not settled)."""
    if before is None or set(before) != set(now):
        return False
    return all(set(before[g]) == set(now[g]) and abs(sum(before[g].values()) - sum(now[g].values()))
               <= tolerance_mb for g in now)


@dataclass
class RunOutcome:
    ok: bool
    seconds: float
    lines: list[str]
    marks: list[tuple[float, str]]  # (wall time the phase started, phase)
    watchdog: str = ""  # "summed RSS X GiB > Y GiB in phase P" when the watchdog stopped it
    steps: list[tuple[float, str]] = field(default_factory=list)  # (wall time, "fl-merge chunks: ..." line)


@dataclass
class LoopbackDeployment:
    work: Path
    env: dict[str, str]
    limit_gib: float = 16.0
    interval: float = 0.2
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.port = _free_port()
        home = self.work / "home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.env = {**self.env, "FLWR_HOME": str(home)}
        self._stop, self.killed = threading.Event(), threading.Event()
        self.watchdog = ""

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.work / f"{name}.log", "w")  # noqa: SIM115 (lives as long as the process)
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start(self, node_configs: list[str], database: Path | None = None, settle: float = 8.0) -> None:
        """SuperLink (state in memory, or sqlite at `database` with a 60 s busy timeout), then
        one SuperNode per node config; wait `settle` seconds for them to connect."""
        link = ([str(BIN / "fl-merge-superlink"), "--sqlite-busy-timeout", "60"] if database
                else [str(BIN / "flower-superlink")])
        self._start("superlink", [*link, "--insecure", "--isolation", "subprocess", "--host",
                                  "127.0.0.1", "--port", str(self.port),
                                  *(["--database", str(database)] if database else [])])
        time.sleep(settle)
        for i, node in enumerate(node_configs):
            self._start(f"supernode{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                          f"127.0.0.1:{self.port}", "--node-config", node,
                                          "--port", str(_free_port())])
        time.sleep(settle)
        threading.Thread(target=self._sample, daemon=True).start()

    def idle(self, seconds: float = 3.0, tolerance_mb: float = 10.0, wait: float = 120.0
             ) -> dict[str, dict[str, float]]:
        """group -> role -> median RSS (MB) over a `seconds` window (nothing submitted), once
        every group has settled: its idle differs from the previous window's by at most
        `tolerance_mb` (a SuperNode starts its SuperExec some seconds after it connects);
        after `wait` seconds the last window is taken as it is."""
        deadline, before = time.time() + wait, None
        while True:
            t0 = time.time()
            time.sleep(seconds)
            window = [s for s in self.samples if s[0] >= t0]
            now = {g: median_idle(window, g) for g in self.procs}
            if settled(before, now, tolerance_mb) or time.time() > deadline:
                return now
            before = now

    def _sample(self) -> None:
        while not self._stop.is_set():
            t, total = time.time(), 0.0
            for group, p in list(self.procs.items()):
                for role, (rss, anon) in sample_tree(p.pid).items():
                    self.samples.append((t, group, role, rss, anon))
                    total += rss
            if total > self.limit_gib * 1024:
                self.watchdog = f"summed RSS {total / 1024:.1f} GiB > {self.limit_gib:g} GiB"
                print(f"WATCHDOG: {self.watchdog}: killing the run", flush=True)
                self.killed.set()
                self.kill_all()
                return
            time.sleep(self.interval)

    def run(self, app: Path, run_config: str, echo: bool = False) -> RunOutcome:
        """`flwr run app loopback --stream --run-config ...`, its log read line by line."""
        seen: list[tuple[float, str, float]] = []
        lines: list[str] = []
        steps: list[tuple[float, str]] = []
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "flwr"), "run", str(app), "loopback", "--stream",
                                 "--run-config", run_config], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs["flwr-run"] = proc
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
            if m := PHASE_PATTERN.search(line):
                seen.append((time.time(), m.group(1), float(m.group(2))))
            if (at := line.find(STEP_MARK)) >= 0:
                steps.append((time.time(), line[at:].strip()))
        proc.wait()
        ok = proc.returncode == 0 and not self.killed.is_set()
        return RunOutcome(ok, time.perf_counter() - t0, lines, wall_marks(seen), self.watchdog, steps)

    def kill_all(self) -> None:
        """SIGKILL every process group started here and every descendant (Flower's SuperExec
        starts the ServerApp/ClientApps in a session of its own)."""
        tree = []
        for p in self.procs.values():
            try:
                tree += psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for child in tree:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass

    def close(self) -> None:
        self._stop.set()
        self.kill_all()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
