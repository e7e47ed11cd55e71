"""EMR (a personal method: one model per client) through Flower's simulation engine, beside
Task Arithmetic on the same client updates: each task is scored on its own model, its
per-task files hold exactly those models, and results/run.json/summary say so. One Flower
start-up (~10 s) feeds every check."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fl_merge import load_merged, merge
from fl_merge.core.task_vectors import task_vector
from fl_merge.io import results
from fl_merge.config.run_config import RunConfig
from simulate import simulate_round

TASKS = ["rotate90", "parity"]


@pytest.fixture(scope="module")
def emr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("emr")
    cfg = RunConfig.from_flower({
        "num-clients": 2, "tasks": ",".join(TASKS), "local-steps": "30,30", "lambdas": "0.5,1,1.5",
        "output-dir": str(out), "method": "emr,task_arithmetic",
    }).resolve()
    return simulate_round(cfg, 2), out


def _accuracy(model: torch.nn.Module, task: str) -> float:
    """Top-1 accuracy on the task's test split, in one plain loop."""
    from fl_merge.tasks.registry import load_task

    x, y = load_task(task, 0).test.tensors
    with torch.no_grad():
        return sum(int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(y), 500)) / len(y)


def test_each_task_is_scored_on_its_own_model_file(emr_run):
    r, out = emr_run
    assert not (out / results.MODEL_FILE).exists()  # the primary (emr) has no one model
    assert (out / results.model_file("task_arithmetic", primary=False)).exists()
    rows = [x for x in results.read_rows(out / results.RESULTS_FILE)
            if x["method"] == "emr" and x["model"] == "merged" and x["selected"] is True and x["split"] == "test"]
    assert sorted(x["task"] for x in rows) == sorted(TASKS) and all(x[results.OWN_MODEL] is True for x in rows)
    for x in rows:
        path = out / results.personal_model_file("emr", x["task"])
        assert _accuracy(load_merged(path, x["task"]), x["task"]) == pytest.approx(x["accuracy"], abs=1e-6)


def test_the_files_are_theta0_plus_eta_times_each_clients_own_delta(emr_run):
    r, out = emr_run
    eta = r.best_etas["emr"]
    taus = [task_vector(c.state, r.theta0, list(r.theta0)) for c in r.clients]
    got = merge("emr", taus, names=[c.identity for c in r.clients])
    files = {}
    for c in r.clients:
        task = r.task_name(c)
        files[task] = load_file(str(out / results.personal_model_file("emr", task)))
        want = got.model(r.theta0, c.identity, eta)
        for key in r.theta0:
            torch.testing.assert_close(files[task][key], want[key])
    assert any(not torch.equal(files[TASKS[0]][k], files[TASKS[1]][k]) for k in r.theta0)


def test_run_json_and_summary_label_the_own_models(emr_run):
    r, out = emr_run
    run = json.loads((out / results.RUN_FILE).read_text())
    assert run["methods"]["emr"][results.OWN_MODEL] is True
    assert results.OWN_MODEL not in run["methods"]["task_arithmetic"]
    assert run["search"]["methods"]["emr"]["settings"] == [{}]  # tuning-free: eta only
    assert 1.0 in run["search"]["methods"]["emr"]["lambdas"]  # the paper's point is searched
    summary = results.format_summary(results.read_rows(out / results.RESULTS_FILE))
    assert "own model per task" in summary.splitlines()[0]
