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


LOST_NAN = {"failures": [{"client": "node 7 (partition 1)", "node_id": 7, "partition_id": 1, "task": "invert",
                          "stage": "train", "reason": "non-finite update in backbone.0.weight"}],
            "missing_tasks": ["invert"], "unscored_tasks": []}


def test_a_lost_client_is_named_with_its_task_stage_and_reason():
    from fl_merge.round.failures import lost_clients

    assert lost_clients(LOST_NAN) == ["task invert, node 7 (partition 1), lost at train: non-finite "
                                      "update in backbone.0.weight; not merged, no results"]
    scored_late = {"failures": [{"client": "node 3", "node_id": 3, "partition_id": None, "task": None,
                                 "stage": "test", "reason": "no reply"}],
                   "missing_tasks": [], "unscored_tasks": ["node 3"]}
    assert lost_clients(scored_late) == ["node 3 lost at test: no reply; merged, but not scored on test"]
    # a task with no usable update that no failure names (a foreign client's partition) still shows
    assert lost_clients({"failures": [], "missing_tasks": ["parity"]}) == [
        "task parity: no usable update; not merged, no results"]
    assert lost_clients({"failures": [], "missing_tasks": [], "unscored_tasks": []}) == []


def test_losses_exit_3_unless_min_clients_allows_them():
    from fl_merge.round.failures import LOST_CLIENTS_EXIT, lost_clients_exit, lost_clients_report

    assert LOST_CLIENTS_EXIT not in (0, 1, 2)  # distinct from success, a failed run and bad input
    assert lost_clients_exit(LOST_NAN, min_clients=0) == LOST_CLIENTS_EXIT
    assert lost_clients_exit(LOST_NAN, min_clients=1) == 0
    assert lost_clients_exit({"failures": [], "missing_tasks": []}, min_clients=0) == 0
    head, line = lost_clients_report(LOST_NAN, 0, 2)
    assert head == ("the results lost 1 of 2 clients; exit status 3 (to accept a run that keeps at "
                    "least 1, set min-clients=1)")
    assert line.startswith("task invert, node 7 (partition 1), lost at train")
    assert lost_clients_report(LOST_NAN, 1, 2)[0] == "the results lost 1 of 2 clients (allowed: min-clients=1)"


@pytest.mark.parametrize("min_clients, code", [(0, 3), (1, 0)])
def test_the_launcher_names_the_lost_task_last_and_exits_3(tmp_path, monkeypatch, capsys, min_clients, code):
    """A run that finished without one client (its results as the ServerApp writes them)."""
    from fl_merge.io import results

    out = tmp_path / "run"

    def finished_without_invert(run_cfg, *args):
        out.mkdir(parents=True)
        results.write_rows(out / results.RESULTS_FILE, [], {})
        results.write_json(out / results.RUN_FILE, LOST_NAN)

    monkeypatch.setattr(run_module, "_execute", finished_without_invert)
    assert launch_main(["--run-config", f'num-clients=2 min-clients={min_clients} output-dir="{out}"']) == code
    err = capsys.readouterr().err.splitlines()
    assert err[-2].startswith("fl-merge-run: the results lost 1 of 2 clients")
    assert err[-1] == ("fl-merge-run: task invert, node 7 (partition 1), lost at train: non-finite update "
                       "in backbone.0.weight; not merged, no results")


def test_flowers_status_details_of_a_failed_run_become_the_one_line_cause():
    """`flwr ls` reports a failed run's exception as 'Simulation failed with exception: ...'
    (flwr.simulation.app); the launcher's one line shows the exception's own text."""
    from fl_merge.engine.superlink import failure_details

    assert failure_details("Simulation failed with exception: merge-keys ['x.*'] match none") == \
        "merge-keys ['x.*'] match none"
    assert failure_details("Task failed with unknown error.\n") == "Task failed with unknown error."
    assert failure_details("") == ""
