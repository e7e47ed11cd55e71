"""A run that fails leaves failure.json in its output directory and every launcher exits
non-zero (the round's own failure record, with the clients, is tested in test_strategy.py
and test_end_to_end.py)."""

from __future__ import annotations

import json

import pytest

from fl_merge.engine import run as run_module
from fl_merge.config.run_config import RunConfig
from fl_merge.cli.launch import main as launch_main
from fl_merge.round.failures import FAILURE_FILE
from fl_merge.engine.run import RunFailed


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


def test_why_a_serverapp_stopped_names_the_cause_and_the_point_of_the_round():
    from fl_merge.round.failures import stopped_reason

    assert stopped_reason(0, parent_gone=True) == (
        "the SuperLink went away while the clients were training (no update had arrived): the "
        "ServerApp's parent process exited, so the SuperLink was stopped or died; the run cannot finish")
    assert stopped_reason(2, parent_gone=False) == (
        "the ServerApp was told to stop after 2 client update(s) had arrived (by Flower: e.g. "
        "`flwr stop` or a lost SuperLink)")


def test_a_failure_record_after_lost_replies_points_at_the_caches_even_with_no_finished_client():
    from fl_merge.round.failures import CACHE_NOTE, failure_record

    lost = failure_record("the SuperLink went away", "round", [], [], [], replies_lost=True)
    assert lost["finished_clients"] == [] and lost["cached_updates"].endswith(CACHE_NOTE)
    assert failure_record("x", "train", [], [], [])["cached_updates"] == "no client finished"
    finished = [{"partition_id": 0}]
    assert failure_record("x", "train", finished, [], [])["cached_updates"] == CACHE_NOTE


def test_flowers_status_details_of_a_failed_run_become_the_one_line_cause():
    """`flwr ls` reports a failed run's exception as 'Simulation failed with exception: ...'
    (flwr.simulation.app); the launcher's one line shows the exception's own text."""
    from fl_merge.engine.superlink import failure_details

    assert failure_details("Simulation failed with exception: merge-keys ['x.*'] match none") == \
        "merge-keys ['x.*'] match none"
    assert failure_details("Task failed with unknown error.\n") == "Task failed with unknown error."
    assert failure_details("") == ""
