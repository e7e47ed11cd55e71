"""fl-merge on Flower's deployment engine: a real SuperLink and 2 SuperNodes as separate
processes on 127.0.0.1, each node choosing its task by --node-config with its own cache
dir. Insecure: every merged model equals the one from the simulation engine, for Task
Arithmetic, for RegMean (whose clients send a Gram matrix per linear layer beside their
update) and for EMR (whose clients are each sent a model of their own). Secure (TLS +
SuperNode auth): an unregistered SuperNode is refused and the run completes without it.

The commands are the ones in docs/deployment.md. Every process is stopped at the end, also
on failure (own sessions, killed as groups).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_merge.io import results

pytestmark = pytest.mark.deployment
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_CONFIG = {"num-clients": 2, "local-steps": "20", "etas": "0.5,1", "cache": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f'"{v}"' if isinstance(v, str) else str(v)


def stop_process_groups(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL, each process's group (each started in a session of its own);
    asserts every one has ended."""
    for p in procs:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
                p.wait(timeout=10)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
    assert all(p.poll() is not None for p in procs)


@contextlib.contextmanager
def _federation(tmp_path: Path, secure: bool = False, extra_nodes: int = 0):
    """A SuperLink + 2 SuperNodes (partition-id 0 and 1, node-local cache dirs) and an env
    whose FLWR_HOME names the connection 'loopback'. secure: TLS with a test CA and
    SuperNode authentication, the 2 nodes' keys registered; `extra_nodes` more SuperNodes
    start with keys that were never registered. Yields (env, logs dir, refused node procs)."""
    port = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    creds = tmp_path / "creds"
    conn = f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\n'
    tls: list[str] = ["--insecure"]
    if secure:
        from fl_merge.deploy.credentials import make_certificates, make_supernode_key

        paths = make_certificates(creds)
        conn += f'root-certificates = "{paths["ca"]}"\n'
        tls = ["--ssl-ca-certfile", str(paths["ca"]), "--ssl-certfile", str(paths["cert"]),
               "--ssl-keyfile", str(paths["key"]), "--enable-supernode-auth"]
    else:
        conn += "insecure = true\n"
    (home / "config.toml").write_text(conn)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    procs: list[subprocess.Popen] = []
    ports = [port]

    def start(cmd: list[str], log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        return procs[-1]

    try:
        start([str(BIN / "flower-superlink"), *tls, "--isolation", "subprocess", "--host", "127.0.0.1",
               "--port", str(port), "--database", str(tmp_path / "state.db")], "superlink.log")
        deadline = time.monotonic() + 60
        while not _port_open(port):
            assert procs[0].poll() is None, (tmp_path / "superlink.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "SuperLink did not start"
            time.sleep(0.3)
        refused = []
        for pid in range(2 + extra_nodes):
            node_tls = ["--insecure"]
            if secure:
                key, pub = make_supernode_key(creds / f"supernode{pid}")
                if pid < 2:  # registered; the extra nodes are not
                    reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(pub), "loopback"],
                                         env=env, capture_output=True, text=True, timeout=120, check=False)
                    assert "registered successfully" in reg.stdout, reg.stdout + reg.stderr
                node_tls = ["--root-certificates", str(creds / "ca.crt"), "--auth-supernode-private-key", str(key)]
            ports.append(_free_port())
            proc = start([str(BIN / "flower-supernode"), *node_tls, "--superlink", f"127.0.0.1:{port}",
                          "--node-config", (f'partition-id={pid % 2} num-partitions=2 '
                                            f'cache-dir="{tmp_path / f"node{pid}"}"'),
                          "--port", str(ports[-1])], f"supernode{pid}.log")
            if pid >= 2:
                refused.append(proc)
        yield env, tmp_path, refused
    finally:
        stop_process_groups(procs)
        assert not any(_port_open(p) for p in ports)  # nothing left listening


# The insecure run's methods: one plain, one with a second client statistic (Gram matrices
# travel from the clients), one personal (a different model travels to each client).
MESSAGE_KINDS = {"method": "fedavg,regmean,emr"}


def _flwr_run(env: dict, out: Path, extra: dict | None = None) -> subprocess.CompletedProcess:
    config = {**RUN_CONFIG, **(extra or {}), "output-dir": str(out)}
    items = " ".join(f"{k}={_toml(v)}" for k, v in config.items())
    return subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream",
                           "--run-config", items], env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def test_deployed_merge_equals_simulated_merge(tmp_path):
    with _federation(tmp_path) as (env, work, _):
        out = work / "deployed"
        proc = _flwr_run(env, out, MESSAGE_KINDS)
    assert (out / results.MODEL_FILE).exists(), proc.stdout[-3000:] + proc.stderr[-3000:]

    # The same run through the simulation engine.
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fl_merge_clients.client_app import app as client_app
    from fl_merge.config.run_config import RunConfig
    from fl_merge_strategies.server_app import run_one_shot

    sim_out = work / "simulated"
    cfg = RunConfig.from_flower({**RUN_CONFIG, **MESSAGE_KINDS, "output-dir": str(sim_out)}).resolve()
    app = ServerApp()

    @app.main()
    def main(grid, context):
        run_one_shot(grid, cfg, run_id=context.run_id)

    run_simulation(app, client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    def models(d: Path) -> list[Path]:  # every merged model file (not predictions.safetensors)
        return sorted(p.relative_to(d) for p in d.rglob("*.safetensors") if p.name != "predictions.safetensors")

    files = models(out)
    # merged.safetensors (fedavg), merged-<regmean label>, and emr's one model per task
    assert len(files) == 4 and sum(f.parent.name.startswith("merged-") for f in files) == 2, files
    assert files == models(sim_out)
    for f in files:  # same updates, same statistics, same Delta, same eta: the same models
        deployed, simulated = load_file(str(out / f)), load_file(str(sim_out / f))
        assert set(deployed) == set(simulated)
        for k in deployed:
            torch.testing.assert_close(deployed[k], simulated[k], rtol=1e-5, atol=1e-6)
    personal = [load_file(str(out / f)) for f in files if f.parent.name.startswith("merged-")]
    assert any(not torch.equal(personal[0][k], personal[1][k]) for k in personal[0])  # own models
    dep_rows, sim_rows = (results.read_rows(d / results.RESULTS_FILE) for d in (out, sim_out))
    assert [r["accuracy"] for r in dep_rows] == pytest.approx([r["accuracy"] for r in sim_rows])
    assert {r["task"] for r in dep_rows} == {"rotate90", "invert"}
    assert {"fedavg", "regmean", "emr"} <= {r["method"] for r in dep_rows}


def test_secure_mode_refuses_an_unregistered_supernode(tmp_path):
    """TLS + SuperNode auth: 2 registered nodes and 1 whose key was never registered. The
    unregistered one is refused (it exits, saying it could not activate); the run completes
    with the registered two."""
    with _federation(tmp_path, secure=True, extra_nodes=1) as (env, work, refused):
        (intruder,) = refused
        assert intruder.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (work / "supernode2.log").read_text()
        out = work / "secure"
        proc = _flwr_run(env, out)
        assert (out / results.MODEL_FILE).exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = results.read_rows(out / results.RESULTS_FILE)
    assert {r["task"] for r in rows} == {"rotate90", "invert"}
    assert "https" in (work / "superlink.log").read_text()
