"""fl-merge across several hosts: the SuperLink and each SuperNode in its own network
namespace (tests/netns.py), talking over a private veth/bridge subnet, never 127.0.0.1,
with TLS (the SuperLink's certificate names its subnet address) and SuperNode
authentication (every node's key registered). `flwr run` runs on the SuperLink's host.

1. The merged model equals the simulation engine's for the same run config.
2. Network faults mid-round: one node's link is cut while it trains, another's is throttled
   to a crawl after it sent its update. The round gives up on each (Flower's heartbeat, not
   the round timeout, which is set far away), finishes with the rest (min-clients allows),
   and run.json names each lost node once, by node id, partition and task, with the
   heartbeat reason. Its SuperNodes run `fl-merge-supernode --heartbeat-interval 10`, so a
   silent node is declared lost 20 s after its last heartbeat (60 s with Flower's default).

Needs root and iproute2; skipped otherwise. Every process is stopped and every namespace
deleted at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import netns
from test_deployment import stop_process_groups
from fl_merge.io import results
from fl_merge.deploy.credentials import make_certificates, make_supernode_key

_WHY = netns.unavailable()
pytestmark = [pytest.mark.deployment,
              pytest.mark.skipif(_WHY is not None, reason=f"no network namespaces: {_WHY}")]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PORT = 9093  # the SuperLink's, on its own host: no clash with anything outside its namespace
CONNECTION = "hosts"
# run on the SuperLink's host (the test process is outside every namespace): exit 0 once
# {address}:{port} accepts, 1 after 60 s
_WAIT_FOR_PORT = """import socket, time
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    with socket.socket() as s:
        if s.connect_ex(("{address}", {port})) == 0:
            raise SystemExit(0)
    time.sleep(0.3)
raise SystemExit(1)"""


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f'"{v}"' if isinstance(v, str) else str(v)


def _run_config(cfg: dict) -> str:
    return " ".join(f"{k}={_toml(v)}" for k, v in cfg.items())


class Federation:
    """A started SuperLink + SuperNodes on a Network; `logs` holds each process's log."""

    def __init__(self, net: netns.Network, work: Path, env: dict, nodes: int) -> None:
        self.net, self.work, self.env, self.nodes = net, work, env, nodes
        self.procs: list[subprocess.Popen] = []

    def start(self, host: str, cmd: list[str], log: str) -> subprocess.Popen:
        with open(self.work / log, "w") as f:
            self.procs.append(self.net.popen(host, cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                             start_new_session=True))
        return self.procs[-1]

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")

    def node_id(self, i: int) -> int:
        """The Flower node id SuperNode i was given (it logs it once registered)."""
        m = re.search(r"SuperNode ID: (\d+)", self.log(f"node{i}"))
        assert m, self.log(f"node{i}")[-2000:]
        return int(m.group(1))

    def flwr_run(self, cfg: dict, **kwargs) -> subprocess.Popen:
        """`flwr run` on the SuperLink's host (it reaches the Control API there)."""
        return self.net.popen("link", [str(BIN / "flwr"), "run", str(ROOT), CONNECTION, "--stream",
                                       "--run-config", _run_config(cfg)], env=self.env, text=True, **kwargs)

    def stop(self) -> None:
        stop_process_groups(self.procs)


@contextlib.contextmanager
def federation(tmp_path: Path, nodes: int, heartbeat: float | None = None):
    """SuperLink on host "link" (10.213.0.1), SuperNode i on host "node<i>" with
    partition-id=i, its own cache dir and its own registered key; TLS with a test CA whose
    server certificate carries the SuperLink's subnet address. With `heartbeat`, the
    SuperNodes are started by fl-merge-supernode announcing that interval."""
    launcher = ([str(BIN / "fl-merge-supernode"), "--heartbeat-interval", str(heartbeat)] if heartbeat
                else [str(BIN / "flower-supernode")])
    hosts = ["link", *(f"node{i}" for i in range(nodes))]
    with netns.network(hosts) as net:
        link = f"{net.ip('link')}:{PORT}"
        creds = tmp_path / "creds"
        ca = make_certificates(creds, hosts=(net.ip("link"),))
        home = tmp_path / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "{link}"\nroot-certificates = "{ca["ca"]}"\n')
        env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        fed = Federation(net, tmp_path, env, nodes)
        try:
            fed.start("link", [str(BIN / "flower-superlink"), "--isolation", "subprocess",
                               "--host", net.ip("link"), "--port", str(PORT),
                               "--ssl-ca-certfile", str(ca["ca"]), "--ssl-certfile", str(ca["cert"]),
                               "--ssl-keyfile", str(ca["key"]), "--enable-supernode-auth",
                               "--database", str(tmp_path / "state.db")], "superlink.log")
            # wait for the SuperLink's port from its own host (the test process is outside)
            wait = _WAIT_FOR_PORT.format(address=net.ip("link"), port=PORT)
            up = net.run("link", [sys.executable, "-c", wait], timeout=90, check=False)
            assert up.returncode == 0, fed.log("superlink")[-2000:]
            for i in range(nodes):
                key, pub = make_supernode_key(creds / f"node{i}")
                reg = net.run("link", [str(BIN / "flwr"), "supernode", "register", str(pub), CONNECTION],
                              env=env, capture_output=True, text=True, timeout=120, check=False)
                assert "registered successfully" in reg.stdout, reg.stdout + reg.stderr
                fed.start(f"node{i}", [*launcher, "--superlink", link,
                                       "--root-certificates", str(ca["ca"]), "--auth-supernode-private-key",
                                       str(key), "--node-config",
                                       f'partition-id={i} num-partitions={nodes} '
                                       f'cache-dir="{tmp_path / f"cache{i}"}"'],
                          f"node{i}.log")
            yield fed
        finally:
            fed.stop()
        left = net.left_after(30)  # Flower's detached children end seconds after their parent
        assert not left, f"processes still on the hosts 30 s after the SuperLink and SuperNodes stopped: {left}"
    assert not any(ns.startswith(net.tag) for ns in netns.namespaces()), "a namespace was left behind"


def _connects(net: netns.Network, host: str, address: str) -> str:
    """Connect from `host` to `address`:PORT; "ok" or the error's name."""
    code = (f"import socket\ntry:\n    socket.create_connection(('{address}', {PORT}), timeout=5)\n"
            "    print('ok')\nexcept OSError as e:\n    print(type(e).__name__)")
    proc = net.run(host, [sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip()


def test_the_hosts_reach_each_other_only_over_the_subnet_and_everything_is_removed():
    with pytest.raises(KeyboardInterrupt), netns.network(["a", "b"]) as net:
        made = list(net.made)
        # a server on host a, left running: leaving the network kills what runs inside
        server = net.popen("a", [sys.executable, "-c", (
            f"import socket, time\ns = socket.create_server(('{net.ip('a')}', {PORT}))\n"
            "print('up', flush=True)\ntime.sleep(120)")], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "up"
        assert _connects(net, "b", net.ip("a")) == "ok"
        assert _connects(net, "b", "127.0.0.1") == "ConnectionRefusedError"  # b's own loopback
        net.cut("b")
        assert _connects(net, "b", net.ip("a")) == "OSError"  # network unreachable
        assert net.pids() == [server.pid]
        raise KeyboardInterrupt  # Ctrl-C inside: the namespaces still go
    assert server.wait(timeout=30) == -signal.SIGKILL
    assert not set(made) & set(netns.namespaces())
    # one left by a process that no longer exists (SIGKILLed test) is removed by the next
    subprocess.run(["ip", "netns", "add", f"{netns.PREFIX}999999999-x"], check=True)
    assert netns.remove_stale() == [f"{netns.PREFIX}999999999-x"]
    assert f"{netns.PREFIX}999999999-x" not in netns.namespaces()


def test_merge_across_hosts_equals_the_simulation(tmp_path):
    cfg = {"num-clients": 2, "local-steps": "20", "etas": "0.5,1", "cache": False}
    with federation(tmp_path, nodes=2) as fed:
        out = tmp_path / "deployed"
        proc = fed.flwr_run({**cfg, "output-dir": str(out)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        stream, _ = proc.communicate(timeout=600)
        assert (out / results.MODEL_FILE).exists(), stream[-3000:] + fed.log("superlink")[-2000:]
        assert "https" in fed.log("superlink")  # TLS on the subnet address
        node_ids = {fed.node_id(i) for i in range(2)}
    run = json.loads((out / results.RUN_FILE).read_text())
    assert {c["node_id"] for c in run["clients"]} == node_ids and not run["failures"]

    from fl_merge.config.run_config import RunConfig
    from simulate import simulate_round

    sim = RunConfig.from_flower({**cfg, "output-dir": str(tmp_path / "simulated")}).resolve()
    simulate_round(sim, num_supernodes=2)  # writes its outputs like the deployed ServerApp
    deployed, simulated = (load_file(str(d / results.MODEL_FILE)) for d in (out, sim.output_dir()))
    assert set(deployed) == set(simulated)
    for k in deployed:  # same updates, same Delta, same eta: the same merged model
        torch.testing.assert_close(deployed[k], simulated[k], rtol=1e-5, atol=1e-6)
    dep_rows, sim_rows = (results.read_rows(d / results.RESULTS_FILE) for d in (out, sim.output_dir()))
    assert [r["accuracy"] for r in dep_rows] == pytest.approx([r["accuracy"] for r in sim_rows])


def _wait_for(pattern: str, read, proc: subprocess.Popen, timeout: float) -> float:
    """Poll `read()` until `pattern` appears; the time it did (monotonic)."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, read()):
        assert proc.poll() is None, "the run ended before: " + read()[-2000:]
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout}s"
        time.sleep(0.2)
    return time.monotonic()


class _Stream:
    """The lines `flwr run --stream` prints, each with the (monotonic) time it arrived."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append((time.monotonic(), line))

    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, pattern: str) -> float:
        times = [t for t, line in self.lines if re.search(pattern, line)]
        assert times, f"no {pattern!r} in the run's log:\n" + self.text()[-3000:]
        return times[0]


def test_cut_and_throttled_links_are_given_up_and_named(tmp_path):
    """3 hosts. node0's link goes down while it trains (its ClientApp has started); node1's
    link is throttled to 1 kbit/s right after it sent its update, so it never returns its
    validation scores. Round timeout 600 s: what ends each wait is Flower's heartbeat (the
    nodes announce 10 s, so a node is offline 2 x 10 s after its last heartbeat). The run
    completes with node1's and node2's updates (min-clients=2), scored by node2."""
    out = tmp_path / "out"
    cfg = {"num-clients": 3, "min-clients": 2, "local-steps": "20", "etas": "1", "cache": False,
           "round-timeout": 600, "output-dir": str(out)}
    with federation(tmp_path, nodes=3, heartbeat=10) as fed:
        proc = fed.flwr_run(cfg, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        stream = _Stream(proc)
        _wait_for(r"Start `flwr-clientapp` process", lambda: fed.log("node0"), proc, 600)
        fed.net.cut("node0")
        t_cut = time.monotonic()
        _wait_for(r"Sent successfully", lambda: fed.log("node1"), proc, 600)
        fed.net.throttle("node1")
        t_slow = time.monotonic()
        assert "tbf" in fed.net.qdiscs("node1")
        proc.wait(timeout=900)
        stream.thread.join(timeout=30)
        ids = [fed.node_id(i) for i in range(3)]
        with sqlite3.connect(tmp_path / "state.db") as db:  # the interval the SuperLink judges them by
            intervals = {i for (i,) in db.execute("SELECT heartbeat_interval FROM node")}
    assert intervals == {10.0}
    log = stream.text()
    assert (out / results.RUN_FILE).exists(), log[-3000:] + fed.log("superlink")[-2000:]
    measured = {"train gave up on the cut node after (s)":
                    stream.first(r"tasks missing from the results") - t_cut,
                "evaluation gave up on the throttled node after (s)":
                    stream.first(r"no evaluation scores from") - t_slow}
    (tmp_path / "measured.json").write_text(json.dumps(measured, indent=1))
    print(measured)
    run = json.loads((out / results.RUN_FILE).read_text())
    tasks = run["tasks"]
    lost = {f["node_id"]: f for f in run["failures"]}
    assert len(run["failures"]) == 2 and set(lost) == set(ids[:2]), run["failures"]  # each once
    cut, slow = lost[ids[0]], lost[ids[1]]
    assert (cut["stage"], cut["partition_id"], cut["task"]) == ("train", 0, tasks[0]), cut
    assert (slow["stage"], slow["partition_id"], slow["task"]) == ("evaluation", 1, tasks[1]), slow
    for f in (cut, slow):  # the true reason: Flower's heartbeat, not the round timeout
        assert "heartbeat" in f["reason"] and "round timeout" not in f["reason"], f
    assert run["missing_tasks"] == [tasks[0]]  # never merged
    assert run["unscored_tasks"] == [tasks[1]]  # merged, but nobody scored it on test
    assert {c["node_id"] for c in run["clients"]} == set(ids[1:])  # both updates merged
    assert {r["task"] for r in results.read_rows(out / results.RESULTS_FILE)} == {tasks[2]}
    assert all(0 < s < 600 for s in measured.values()), measured  # given up, and before the timeout
