"""Child processes of a run: the environment they get, streaming their output to a log,
and stopping a child's whole process tree (it and, e.g., its Ray workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
ERROR_TAG = "fl-merge job error: "


class RunFailed(RuntimeError):
    """A run that started but did not finish; the message names the cause and the log."""


def child_env(extra_path: Sequence[str] = ()) -> dict[str, str]:
    """This environment for a child: our code first on PYTHONPATH (Ray workers too)."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), *extra_path, os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and every descendant now alive (psutil), also those that left its process group
    or session (a daemon that called setsid, e.g. Ray's); empty when `pid` is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_group(pid: int, grace: float = 5.0, wait: Callable[[float], Any] | None = None,
               first: signal.Signals = signal.SIGINT) -> None:
    """Stop child `pid` (started in its own session) and everything it started, e.g. Ray
    workers: `first` (SIGINT) to its process group, then SIGKILL to the group and to every
    process of its tree (psutil; found before signalling, so descendants that left the group
    are stopped too). psutil checks each process's start time, so a reused pid is never hit."""
    tree = process_tree(pid)
    if wait is not None:
        try:
            os.killpg(pid, first)
        except ProcessLookupError:
            return
        try:
            wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in tree:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def stream_child(cmd: list[str], log_path: Path, stream: bool, env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd` in its own session, its output to `log_path` (and stdout when `stream`).
    Returns (exit code, error line). On Ctrl-C the child's group is stopped, then re-raised."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, cwd=os.getcwd())
    error, last = "", ""
    try:
        with open(log_path, "w") as log:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if stream:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if ERROR_TAG in line:
                    error = line.split(ERROR_TAG, 1)[1].strip()
                elif line.strip():
                    last = line.strip()
        code = proc.wait()
    except BaseException:  # Ctrl-C: stop the child and its Ray processes, then re-raise
        stop_group(proc.pid, wait=lambda t: proc.wait(timeout=t))
        raise
    stop_group(proc.pid)  # whatever the finished child left in its group (Ray workers)
    return code, error or last


