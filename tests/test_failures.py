"""A run that fails leaves failure.json in its output directory and every launcher exits
non-zero (the round's own failure record, with the clients, is tested in test_strategy.py
and test_end_to_end.py)."""

from __future__ import annotations

import json

import pytest

from fl_merge import run as run_module
from fl_merge.config import RunConfig
from fl_merge.launch import main as launch_main
from fl_merge.round.failures import FAILURE_FILE
from fl_merge.run import RunFailed


@pytest.fixture
def failing_run(monkeypatch):
    """The run itself (Flower) fails as `flwr run` reports a failed run."""
    def fail(run_cfg, *args):
        raise RunFailed("Flower run 7 ended as 'finished:failed' (log: x)")

    monkeypatch.setattr(run_module, "_execute", fail)


def test_a_failed_run_writes_its_reason_and_replaces_a_stale_one(tmp_path, failing_run):
    out = tmp_path / "run"
    out.mkdir()
    (out / FAILURE_FILE).write_text('{"reason": "an earlier run"}')
    cfg = RunConfig.from_flower({"num-clients": 2, "output-dir": str(out)})
    with pytest.raises(RunFailed, match="finished:failed"):
        run_module.run(cfg, progress=False)
    assert json.loads((out / FAILURE_FILE).read_text()) == {
        "status": "failed", "reason": "Flower run 7 ended as 'finished:failed' (log: x)"}


def test_the_launcher_exits_non_zero_on_a_failed_run(tmp_path, failing_run, capsys):
    out = tmp_path / "run"
    assert launch_main(["--run-config", f'num-clients=2 output-dir="{out}"']) == 1
    assert "finished:failed" in capsys.readouterr().err
    assert (out / FAILURE_FILE).exists()


def test_a_round_failure_written_by_the_server_is_kept(tmp_path, monkeypatch):
    """The ServerApp's failure.json (with the clients) is not overwritten by the launcher's."""
    out = tmp_path / "run"

    def fail(run_cfg, *args):
        out.mkdir(parents=True, exist_ok=True)
        (out / FAILURE_FILE).write_text('{"status": "failed", "lost_clients": [1]}')
        raise RunFailed("the run failed (exit 1)")

    monkeypatch.setattr(run_module, "_execute", fail)
    with pytest.raises(RunFailed):
        run_module.run(RunConfig.from_flower({"num-clients": 2, "output-dir": str(out)}), progress=False)
    assert json.loads((out / FAILURE_FILE).read_text())["lost_clients"] == [1]
