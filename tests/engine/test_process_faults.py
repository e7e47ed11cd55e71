"""Real process faults on loopback: a SuperLink and 3 SuperNodes as processes on 127.0.0.1,
killed with real signals (issue 17 item 4). Nothing is injected into the clients: a
client's log line (clients.client_app.TRAINING_LINE / CACHED_LINE, in its SuperNode's
output) says when it is training and when its update is in the node's cache.

1. A SuperNode SIGKILLed while its ClientApp trains: the round completes with the other
   two, the lost node is named once (node id, partition, task, heartbeat reason), and its
   orphaned flwr-clientapp ends by itself (Flower's parent monitor). The SuperNodes are
   started by `fl-merge-supernode --heartbeat-interval 10` (Flower's shortest), so the lost
   node is declared 20 s after its last heartbeat, not 60 s; the SuperLink's state records
   the interval each node announced.
2. The SuperLink SIGKILLed after two clients cached their update and while the third
   trains: `flwr run` exits non-zero naming the lost connection, the ServerApp writes
   failure.json (beside its run.log, the only files in the output directory) and ends by itself (fl_merge's
   parent watch), the SuperNodes give up after --max-wait-time and end on SIGTERM, their
   ClientApps with them; a re-run with a fresh SuperLink and the same node caches reuses
   the finished updates (the third client's too if it finished after the kill: its
   SuperNode was alive) and completes.

Every process carries an environment tag (fl_merge.deploy.processes.TAG_VAR): teardown finds and
stops exactly ours, also those whose parent died, and asserts none is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fl_merge_clients.client_app import CACHED_LINE, TRAINING_LINE
from fl_merge.io import results
from fl_merge.deploy.processes import TAG_VAR, new_tag, tagged_processes
from fl_merge.round.failures import FAILURE_FILE
from test_deployment import BIN, ROOT, _free_port, _toml

pytestmark = pytest.mark.deployment
TASKS = ["rotate90", "invert", "patch-shuffle"]  # mnist8's first three: partitions 0, 1, 2
HEARTBEAT = 10.0  # seconds: Flower's shortest; a node is lost 2 x this after its last heartbeat


def _wait(what: str, check, timeout: float, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, (f"timed out after {timeout:.0f}s waiting for {what}; "
                                             f"running: {_ps()}")
        time.sleep(poll)
    return value


def _ps() -> list[str]:
    """Flower's processes now running (for a timeout's message)."""
    names = ("flower-super", "flwr-")
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(n in cmd for n in names):
            found.append(f"{p.info['pid']} {cmd[:100]}")
    return found


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Federation:
    """SuperLink and SuperNodes started by this test, each in its own session, all tagged."""

    def __init__(self, tmp: Path):
        self.tmp, self.tag, self.procs = tmp, new_tag(), []
        self.env = {**os.environ, TAG_VAR: self.tag, "FLWR_HOME": str(tmp / "flwr-home"),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
        (tmp / "flwr-home").mkdir()
        self.port = 0

    def start(self, cmd: list[str], log: str) -> subprocess.Popen:
        with open(self.tmp / log, "w") as f:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        return self.procs[-1]

    def superlink(self, name: str) -> subprocess.Popen:
        """A fresh SuperLink (own database) on a free port; the connection 'loopback' names it."""
        self.port = _free_port()
        (self.tmp / "flwr-home" / "config.toml").write_text(
            f'[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        link = self.start([str(BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess",
                           "--host", "127.0.0.1", "--port", str(self.port),
                           "--database", str(self.tmp / f"{name}.db")], f"{name}.log")
        _wait("the SuperLink's port", lambda: _listening(self.port), 60)
        return link

    def supernode(self, pid: int, log: str, *extra: str, heartbeat: float | None = None) -> subprocess.Popen:
        """SuperNode `pid`; with `heartbeat`, started by fl-merge-supernode with that interval."""
        node = f'partition-id={pid} num-partitions={len(TASKS)} cache-dir="{self.tmp / f"cache{pid}"}"'
        launcher = ([str(BIN / "fl-merge-supernode"), "--heartbeat-interval", str(heartbeat)] if heartbeat
                    else [str(BIN / "flower-supernode")])
        return self.start([*launcher, "--insecure", "--superlink",
                           f"127.0.0.1:{self.port}", *extra, "--node-config", node,
                           "--port", str(_free_port())], log)

    def flwr_run(self, config: dict, log: str) -> subprocess.Popen:
        items = " ".join(f"{k}={_toml(v)}" for k, v in config.items())
        return self.start([str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream",
                           "--run-config", items], log)

    def text(self, log: str) -> str:
        return (self.tmp / log).read_text(errors="replace")

    def close(self) -> None:
        """SIGTERM to every tagged process, SIGKILL to what is left after 10 s (a ServerApp
        stuck in Flower's retries ignores SIGTERM); reap our own children."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            left = tagged_processes(self.tag)
            for p in left:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(left, timeout=grace)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        assert tagged_processes(self.tag) == [], "processes of this test are left running"


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.close()


def _node_id(log_text: str) -> int:
    return int(re.search(r"SuperNode ID: (\d+)", log_text).group(1))


def _clientapps(node: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(node.pid).children(recursive=True)
                if "flwr-clientapp" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _training(pid: int, steps: int) -> str:
    return TRAINING_LINE.format(pid=pid, task=TASKS[pid], steps=steps)


def _cached(pid: int) -> str:
    return CACHED_LINE.format(pid=pid, path="")


def test_supernode_killed_while_training(federation, capsys):
    """3 SuperNodes announcing a 10 s heartbeat, min-clients 2; node 1 is SIGKILLed while its
    ClientApp trains."""
    fed = federation
    fed.superlink("superlink")
    nodes = [fed.supernode(i, f"node{i}.log", heartbeat=HEARTBEAT) for i in range(3)]
    out = fed.tmp / "out"
    run = fed.flwr_run({"num-clients": 3, "min-clients": 2, "local-steps": "30,600,30", "etas": "1",
                        "search": "off", "round-timeout": 300.0, "output-dir": str(out)}, "run.log")
    _wait("node 1 training", lambda: _training(1, 600) in fed.text("node1.log"), 300)
    (clientapp,) = _clientapps(nodes[1])  # the ClientApp process that is training
    lost_id = _node_id(fed.text("node1.log"))
    os.kill(nodes[1].pid, signal.SIGKILL)
    nodes[1].wait()  # reaped, as a shell or service manager would
    t_kill = time.monotonic()
    # The orphan: Flower's parent monitors (SuperExec -> ClientApp) stop it; nothing of ours.
    _wait("the orphaned ClientApp to end by itself", lambda: not _alive(clientapp), 90)
    orphan_s = time.monotonic() - t_kill
    assert run.wait(timeout=420) == 0, fed.text("run.log")[-3000:]
    round_s = time.monotonic() - t_kill

    meta = json.loads((out / results.RUN_FILE).read_text())
    (lost,) = meta["failures"]  # named once
    assert (lost["node_id"], lost["partition_id"], lost["task"], lost["stage"]) == (
        lost_id, 1, "invert", "train")
    assert "heartbeat" in lost["reason"], lost["reason"]
    assert meta["missing_tasks"] == ["invert"]
    assert {r["task"] for r in results.read_rows(out / results.RESULTS_FILE)} == {"rotate90", "patch-shuffle"}
    assert not (out / FAILURE_FILE).exists()
    with sqlite3.connect(fed.tmp / "superlink.db") as db:  # what the SuperLink judges them by
        assert {i for (i,) in db.execute("SELECT heartbeat_interval FROM node")} == {HEARTBEAT}
    with capsys.disabled():
        print(f"\n[supernode kill] orphaned ClientApp ended {orphan_s:.0f}s after the kill; the round "
              f"finished {round_s:.0f}s after it")


def test_superlink_killed_mid_round_then_rerun_from_the_caches(federation, capsys):
    """Partitions 0 and 1 cache their update, partition 2 is still training: the SuperLink
    is SIGKILLed. Then a fresh SuperLink and SuperNodes with the same caches re-run it."""
    fed = federation
    link = fed.superlink("superlink")
    nodes = [fed.supernode(i, f"node{i}.log", "--max-wait-time", "10") for i in range(3)]
    config = {"num-clients": 3, "local-steps": "30,30,150", "etas": "1", "search": "off",
              "round-timeout": 300.0}
    out = fed.tmp / "out"
    run = fed.flwr_run({**config, "output-dir": str(out)}, "run.log")
    _wait("partitions 0, 1 cached and 2 training",
          lambda: (_cached(0) in fed.text("node0.log") and _cached(1) in fed.text("node1.log")
                   and _training(2, 150) in fed.text("node2.log")), 300)
    assert _cached(2) not in fed.text("node2.log")
    serverapp = [p for p in tagged_processes(fed.tag) if "flwr-serverapp" in " ".join(p.cmdline())]
    assert len(serverapp) == 1
    os.kill(link.pid, signal.SIGKILL)
    link.wait()
    t_kill = time.monotonic()

    # flwr run: non-zero, naming the lost connection
    code = run.wait(timeout=120)
    run_s = time.monotonic() - t_kill
    assert code != 0
    assert "Connection to the SuperLink is unavailable" in " ".join(fed.text("run.log").split())
    # The ServerApp ends by itself (fl_merge's parent watch; Flower's own retries never end).
    _wait("the orphaned ServerApp to end by itself", lambda: not _alive(serverapp[0]), 90)
    serverapp_s = time.monotonic() - t_kill
    # No half-written output: only failure.json, saying why, beside the ServerApp's run.log.
    assert sorted(p.name for p in out.iterdir()) == [FAILURE_FILE, "run.log"]
    failure = json.loads((out / FAILURE_FILE).read_text())
    assert failure["status"] == "failed" and "the SuperLink went away" in failure["reason"], failure
    assert "client-update cache" in failure["cached_updates"]
    # The SuperNodes stop retrying after --max-wait-time ...
    _wait("the SuperNodes to give up on the SuperLink",
          lambda: all("Giving up reconnection" in fed.text(f"node{i}.log") for i in range(3)), 120, poll=1.0)
    # ... but (flwr 1.41) their processes stay, held by their Runtime API thread: SIGTERM ends
    # them, and their SuperExecs and ClientApps (node 2's was still training) follow.
    lingering = [n for n in nodes if n.poll() is None]
    for n in lingering:
        n.send_signal(signal.SIGTERM)

    def ended() -> bool:  # reap the SuperNodes: a zombie parent looks alive to Flower's monitors
        return all(n.poll() is not None for n in nodes) and not tagged_processes(fed.tag)

    _wait("every process of the first run to end", ended, 60, poll=1.0)
    quiet_s = time.monotonic() - t_kill

    # The re-run: fresh SuperLink, fresh SuperNodes, the same node caches, the same config.
    t_rerun = time.monotonic()
    fed.superlink("superlink2")
    for i in range(3):
        fed.supernode(i, f"rerun-node{i}.log")
    out2 = fed.tmp / "out2"
    rerun = fed.flwr_run({**config, "output-dir": str(out2)}, "rerun.log")
    assert rerun.wait(timeout=420) == 0, fed.text("rerun.log")[-3000:]
    rerun_s = time.monotonic() - t_rerun
    meta = json.loads((out2 / results.RUN_FILE).read_text())
    # Partition 2's ClientApp, training at the kill, went on (its SuperNode was alive) and
    # stored its update if it finished before its SuperNode was stopped: then it is reused too.
    finished_late = _cached(2) in fed.text("node2.log")
    cached = {c["partition-id"]: c["cached"] for c in meta["clients"]}
    assert cached == {0: 1, 1: 1, 2: int(finished_late)}  # finished clients came from their caches
    for i, steps in ((0, 30), (1, 30), (2, 150)):  # and trained again only if they had not
        assert (_training(i, steps) in fed.text(f"rerun-node{i}.log")) == (not cached[i])
    assert meta["failures"] == [] and meta["missing_tasks"] == []
    assert {r["task"] for r in results.read_rows(out2 / results.RESULTS_FILE)} == set(TASKS)
    assert not (out2 / FAILURE_FILE).exists()
    with capsys.disabled():
        print(f"\n[superlink kill] flwr run exited {run_s:.0f}s after the kill (code {code}), the ServerApp "
              f"{serverapp_s:.0f}s after it; {len(lingering)} SuperNode(s) still up after giving up, "
              f"SIGTERMed; all ended {quiet_s:.0f}s after the kill; partition 2 finished after the kill: "
              f"{finished_late}; the re-run took {rerun_s:.0f}s")


def test_fl_merge_run_fails_in_one_line_when_its_superlink_dies(tmp_path, capsys):
    """The launcher (`fl-merge-run`, superlink engine) whose private SuperLink is SIGKILLed
    mid-round: exit 1, one line naming the cause, only run.log and failure.json in the
    output directory, and nothing left of what it started (its tag finds the ServerApp and
    simulation processes that the dead SuperLink's tree no longer reaches)."""
    out = tmp_path / "out"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    launcher = subprocess.Popen(
        [str(BIN / "python"), "-m", "fl_merge.cli.launch", "--run-config",
         f'num-clients=2 local-steps="300" etas="1" search="off" cache=false output-dir="{out}"'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    tag = ""
    try:
        def superlink():
            return next((p for p in psutil.Process(launcher.pid).children()
                         if "flower-superlink" in " ".join(p.cmdline())), None)

        link = _wait("the launcher's SuperLink", superlink, 300)
        tag = link.environ()[TAG_VAR]
        _wait("the round to start", lambda: "configure_train" in (out / "run.log").read_text()
              if (out / "run.log").exists() else False, 300)
        link.kill()
        _, err = launcher.communicate(timeout=180)
        assert launcher.returncode == 1
        (line,) = [x for x in err.splitlines() if x.strip()]
        assert line.startswith("fl-merge-run: error: the SuperLink died during the run "
                               "(killed by SIGKILL)"), err
        assert sorted(p.name for p in out.iterdir()) == ["failure.json", "run.log"]
        # the launcher's record, or the ServerApp's own if its parent watch was first
        reason = json.loads((out / FAILURE_FILE).read_text())["reason"]
        assert re.search(r"the SuperLink (died|went away)", reason)
        _wait("the launcher's processes to end", lambda: not tagged_processes(tag), 10)  # it stopped them all
    finally:
        for p in tagged_processes(tag) if tag else []:
            p.kill()
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
