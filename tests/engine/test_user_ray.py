"""A run of fl-merge's simulation engine on a machine where the user runs a Ray cluster of
their own (`ray start`): ray.init() without an address joins the cluster that `ray start`
recorded in <Ray temp dir>/ray/ray_current_cluster, and a run that joined this one (0 CPUs)
could never place its clients. fl_merge/engine/superlink.py gives each run RAY_ADDRESS=local,
so it starts a Ray of its own and finishes. In `make test-deployment` (a real `ray start`
beside the run, ~30 s)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fl_merge.cli.launch import main as launch_main
from fl_merge.deploy.processes import stop_group
from fl_merge.engine.superlink import _free_port
from fl_merge.io import results

pytestmark = pytest.mark.deployment


@contextlib.contextmanager
def user_ray_cluster(monkeypatch):
    """`ray start --head --num-cpus 0` with its own Ray temp dir ($RAY_TMPDIR, set for the
    test too), up until its address file exists; every process of it stopped afterwards
    (never `ray stop`, which stops every Ray on the machine)."""
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--num-cpus", "0", "--include-dashboard", "false", "--disable-usage-stats",
                             "--port", str(_free_port())], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (tmp / "ray" / "ray_current_cluster").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "ray start did not come up"
            time.sleep(0.5)
        yield
    finally:
        stop_group(proc.pid, grace=15, wait=proc.wait, first=signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_run_beside_a_users_ray_cluster_starts_its_own(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with user_ray_cluster(monkeypatch):
        code = launch_main(["--run-config", f'num-clients=2 local-steps=10 etas="1" search=off '
                                            f'measure-heterogeneity=false round-timeout=300 output-dir="{out}"'])
    assert code == 0
    assert {r["task"] for r in results.read_rows(out / results.RESULTS_FILE)} == {"rotate90", "invert"}
