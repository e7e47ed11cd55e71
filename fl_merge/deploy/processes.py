"""Child processes of a run: the environment they get, streaming their output to a log,
stopping a child's whole process tree (it and, e.g., its Ray workers), finding everything a
child started by an environment tag (also what was re-parented or left its session), and a
watchdog that ends a process whose parent is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]  # the checkout: fl_merge/deploy/processes.py -> ../../
ERROR_TAG = "fl-merge job error: "
# Set in a child's environment, inherited by everything it starts (Flower's SuperExec,
# ServerApp and ClientApps, Ray workers): finds them after their parent died or they left
# its session (flower-superlink starts its SuperExec in a session of its own).
TAG_VAR = "FL_MERGE_PROCESS_TAG"
ORPHAN_EXIT = 70  # exit code of a process ended by `watch_parent`


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


def exit_text(returncode: int) -> str:
    """A process's end in words: 'killed by SIGKILL' (negative code: the signal) or 'exited
    with code N'."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def new_tag() -> str:
    return uuid.uuid4().hex


def has_tag(environ: Mapping[str, str], tag: str) -> bool:
    """Whether a process environment carries `tag` (an empty tag matches nothing)."""
    return bool(tag) and environ.get(TAG_VAR) == tag


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every live process (not this one) started with TAG_VAR=`tag` in its environment."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and has_tag(p.environ(), tag):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, a zombie, or not ours
            continue
    return found


def stop_group(pid: int, grace: float = 5.0, wait: Callable[[float], Any] | None = None,
               first: signal.Signals = signal.SIGINT, tag: str = "") -> None:
    """Stop child `pid` (started in its own session) and everything it started, e.g. Ray
    workers: `first` (SIGINT) to its process group, then SIGKILL to the group and to every
    process of its tree (psutil; found before signalling, so descendants that left the group
    are stopped too) and, with `tag`, to every process carrying it (`tagged_processes`: also
    those whose parent died before, so the tree no longer reaches them). psutil checks each
    process's start time, so a reused pid is never hit."""
    tree = process_tree(pid) + (tagged_processes(tag) if tag else [])
    if wait is not None:
        try:
            os.killpg(pid, first)
        except ProcessLookupError:
            pass  # the group is gone; its tree or tagged processes may not be
        try:
            wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(3):  # tagged processes started meanwhile (e.g. by a SuperExec) too
        for p in tree:
            try:
                p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        deadline = time.monotonic() + 5.0
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = tagged_processes(tag) if tag else []
        if not tree:
            break


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a killed process whose parent has not reaped it yet)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
                log.flush()  # the log shows the run as it goes (tail -f; a watcher's test)
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




def orphan_check(start_ppid: int, ppid: int, gone_since: float | None, now: float,
                 grace: float) -> tuple[float | None, bool]:
    """(when the parent went, whether to give up now) for a process that started under
    parent `start_ppid` and now has parent `ppid`: the parent is gone once the process was
    re-parented (to init or a subreaper); give up `grace` seconds after that."""
    if ppid == start_ppid:
        return None, False
    since = now if gone_since is None else gone_since
    return since, now - since >= grace


def watch_parent(on_orphaned: Callable[[], None], grace: float = 10.0, poll: float = 0.5
                 ) -> threading.Event:
    """When this process's parent goes away (it is re-parented): `on_orphaned()` at once
    (e.g. record why), then os._exit(ORPHAN_EXIT) `grace` seconds later unless the process
    ended before. A daemon thread; setting the returned Event stops the watch, unless the
    parent is already gone.

    Why: a Flower ServerApp whose SuperLink is SIGKILLed gets SIGINT from Flower's own
    parent monitor and is force-exited 5 s later, before its own code can record anything,
    or, with its threads retrying the lost SuperLink, it lives on as an orphan that ignores
    SIGTERM (both seen with flwr 1.41, docs/deployment.md). The grace leaves Flower's own
    shutdown the first chance."""
    stop = threading.Event()
    start_ppid = os.getppid()

    def watch() -> None:
        since = None
        while not (stop.wait(poll) and since is None):
            was = since
            since, give_up = orphan_check(start_ppid, os.getppid(), since, time.monotonic(), grace)
            if since is not None and was is None:
                try:
                    on_orphaned()
                except Exception:  # noqa: BLE001 - the exit below must happen regardless
                    pass
            if give_up:
                os._exit(ORPHAN_EXIT)

    threading.Thread(target=watch, name="fl-merge-parent-watch", daemon=True).start()
    return stop
