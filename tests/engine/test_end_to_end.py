"""The whole one-shot round through Flower: in-process simulation and the `flwr run` demo.

Each Flower run costs ~10 s of Ray start-up, so one simulation (and its spilled twin, shared
with test_merged_model through conftest.fisher_runs) feeds several checks and the launcher is
run here once, on a deliberately broken app (its good run is the README demo's,
tests/test_readme_demo.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_merge.io import results
from fl_merge.config.run_config import RunConfig
from fl_merge.models.evaluation import select_eta
from fl_merge.cli.launch import main as launch_main
from simulate import simulate_round

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def simulated(fisher_runs):
    """One K=2 Fisher-merging run with heterogeneous local steps (clients compute and send
    their diagonal Fisher), in memory (conftest.fisher_runs); returns (strategy, output dir)."""
    return fisher_runs[0]


def test_each_client_ran_its_own_task_and_steps(simulated):
    strategy, _ = simulated
    by_task = {strategy.task_name(c): c.metrics for c in strategy.clients}
    assert set(by_task) == {"rotate90", "parity"}
    assert by_task["rotate90"]["local-steps"] == 40 and by_task["parity"]["local-steps"] == 60
    assert by_task["parity"]["num-examples"] == 2000
    for m in by_task.values():
        assert m["train-loss"] < m["train-loss-first"]


def test_delta_is_fisher_weighted_mean_of_client_updates(simulated):
    strategy, _ = simulated
    theta0 = strategy.theta0
    f0 = strategy.method_params.get("min_fisher", 1e-6)  # the floor added to every Fisher
    for key in theta0:
        taus = [c.state[key] - theta0[key] for c in strategy.clients]
        fishers = [c.extras["fisher"][key] for c in strategy.clients]
        assert all(bool((f >= 0).all()) for f in fishers) and any(bool((f > 0).any()) for f in fishers)
        expected = (sum(0.5 * (f + f0) * t for f, t in zip(fishers, taus))
                    / sum(0.5 * (f + f0) for f in fishers))
        torch.testing.assert_close(strategy.delta[key], expected, rtol=1e-4, atol=1e-6)
    # Heads are per task (2 and 10 classes) and never merged; Fisher covers the backbone only.
    assert all(not k.startswith("head.") for k in strategy.delta)
    shapes = sorted(c.per_task["head.weight"].shape[0] for c in strategy.clients)
    assert shapes == [2, 10]
    assert all(set(c.extras["fisher"]) == set(theta0) for c in strategy.clients)


def test_results_file_and_merged_model(simulated):
    strategy, out = simulated
    rows = results.read_rows(out / results.RESULTS_FILE)
    etas = [0.0, 0.5, 1.0, 2.0]
    # per task: val has a fine-tuned row + one per eta (eta 0 = base); test is scored only
    # for the fine-tuned model, the base and the eta chosen on val
    assert len(rows) == 2 * ((1 + len(etas)) + 3)
    val = [r for r in rows if r["split"] == "val" and r["model"] != "finetuned"]
    acc = {t: [r["accuracy"] for r in sorted((r for r in val if r["task"] == t), key=lambda r: r["eta"])]
           for t in ("rotate90", "parity")}
    ft = {t: next(r["finetuned_accuracy"] for r in val if r["task"] == t) for t in acc}
    best, _ = select_eta(etas, acc, ft)
    assert best == strategy.best_eta > 0
    chosen = [r for r in rows if r["selected"] and r["split"] == "test"]
    assert len(chosen) == 2 and all(r["eta"] == best for r in chosen)
    for r in chosen:
        assert math.isclose(r["normalized_accuracy"], r["accuracy"] / r["finetuned_accuracy"])
        assert r["accuracy"] > 0.5  # far above chance (0.1 and 0.5)
    saved = load_file(str(out / results.MODEL_FILE))
    for k, v in strategy.theta0.items():
        torch.testing.assert_close(saved[k], v + best * strategy.delta[k], rtol=1e-5, atol=1e-6)
    assert saved["heads.parity.weight"].shape == (2, 128)
    # The test accuracy reported at the chosen eta is that of the saved merged model.
    from fl_merge.tasks.registry import load_task
    from fl_merge_clients.training import model_for_task
    from fl_merge.models.evaluation import evaluate

    for r in chosen:
        head = {f"head.{k.split('.')[-1]}": v for k, v in saved.items() if k.startswith(f"heads.{r['task']}.")}
        backbone = {k: v for k, v in saved.items() if k.startswith("backbone.")}
        task = load_task(r["task"], 0)
        acc, _ = evaluate(model_for_task("mnist-cnn", task, {**backbone, **head}, 0), task.test)
        assert acc == pytest.approx(r["accuracy"])
    assert (out / results.RUN_FILE).exists()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spilled_round_writes_the_same_merged_model(fisher_runs):
    """spill=true (train replies and task vectors on disk, fl_merge/io/spill.py) through the
    ServerApp: the same config, same client updates (the client cache), gives the same merged
    file as the in-memory round that the tests above check against their own computation;
    the spill folder is removed with the round."""
    (_, out), (r, spilled) = fisher_runs
    assert json.loads((spilled / results.RUN_FILE).read_text())["config"]["spill"] is True
    assert all(c.metrics.get("cached") for c in r.clients)  # the in-memory run's updates, reused
    want, got = load_file(str(out / results.MODEL_FILE)), load_file(str(spilled / results.MODEL_FILE))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not list(spilled.glob(".spill-*"))


def test_predictions_file_holds_per_example_test_correctness(simulated):
    """predictions.safetensors: the chosen merged model's and the base's 0/1 per test example;
    their means are results.csv's test accuracies, and the merged one is the saved model's own
    per-example correctness; run.json has the CI table."""
    from fl_merge.tasks.registry import load_task
    from fl_merge_clients.training import model_for_task
    from fl_merge.io.predictions import PREDICTIONS_FILE, load_predictions

    strategy, out = simulated
    preds = load_predictions(out / PREDICTIONS_FILE)
    label = strategy.primary
    assert set(preds) == {label, "base"} and set(preds[label]) == {"rotate90", "parity"}
    rows = [r for r in results.read_rows(out / results.RESULTS_FILE) if r["split"] == "test"]
    for r in rows:
        if r["model"] == "base" or (r["model"] == "merged" and r["selected"]):
            got = preds["base" if r["model"] == "base" else label][r["task"]]
            assert sum(got) / len(got) == pytest.approx(r["accuracy"], abs=1e-12)
    saved = load_file(str(out / results.MODEL_FILE))
    head = {f"head.{k.split('.')[-1]}": v for k, v in saved.items() if k.startswith("heads.parity.")}
    task = load_task("parity", 0)
    backbone = {k: v for k, v in saved.items() if k.startswith("backbone.")}
    model = model_for_task("mnist-cnn", task, {**backbone, **head}, 0).eval()
    x, y = task.test.tensors
    with torch.no_grad():
        right = (model(x).argmax(dim=1) == y).int().tolist()
    assert preds[label]["parity"] == right
    comparison = json.loads((out / results.RUN_FILE).read_text())["comparison"]
    first = next(c for c in comparison if c["model"] == label)
    assert first["ci_low"] < first["accuracy"] < first["ci_high"] and "diff" not in first  # no TA in this run


def test_heterogeneity_is_measured_from_the_round(simulated):
    """Clients sent their gradient at theta0; the report matches the updates it came from."""
    from fl_merge.stats.heterogeneity import cosine_matrix

    strategy, out = simulated
    het = strategy.heterogeneity
    assert all("grad0" in c.extras for c in strategy.clients)
    taus = [{k: c.state[k] - strategy.theta0[k] for k in strategy.theta0} for c in strategy.clients]
    expected = float(cosine_matrix(taus)[0, 1])
    assert het["cosine_matrix"][0][1] == pytest.approx(expected, rel=1e-6)
    assert het["b_dissimilarity"] >= 1.0 and het["grad_diversity"] > 0
    assert het["steps_cv"] == pytest.approx(0.2)  # steps 40 and 60: std 10 / mean 50
    rows = results.read_rows(out / results.RESULTS_FILE)
    assert all(r["het_mean_cosine"] == pytest.approx(expected, rel=1e-6) for r in rows)


def test_crashing_client_is_left_out_and_attacker_flips_its_update(tmp_path):
    """K=3: partition 1 crashes during training, partition 2 attacks with sign_flip. The run
    still finishes with the other two, names the crashed client, flags the attacker's rows,
    and the attacker really sent minus its honest update."""
    from fl_merge_clients.client_app import local_train

    cfg = RunConfig.from_flower({
        "num-clients": 3, "tasks": "rotate90,parity,invert", "local-steps": "20", "etas": "1",
        "output-dir": str(tmp_path), "method": "fedavg,median", "faults": "crash@1",
        "attack": "sign_flip", "attackers": "2",
    }).resolve()
    strategy = simulate_round(cfg, 3)
    assert [int(c.metrics["partition-id"]) for c in strategy.clients] == [0, 2]
    meta = json.loads((tmp_path / results.RUN_FILE).read_text())
    (failure,) = meta["failures"]
    assert failure["stage"] == "train"
    # named once, by node id and (by elimination: partitions 0 and 2 replied) partition 1, parity
    assert (failure["partition_id"], failure["task"]) == (1, "parity")
    assert failure["client"] == f"node {failure['node_id']} (partition 1)"
    assert meta["missing_tasks"] == ["parity"]
    assert failure["reason"].endswith("injected fault: partition 1 crashed during training")
    assert "\n" not in failure["reason"]  # the exception line, not Ray's whole traceback
    rows = results.read_rows(tmp_path / results.RESULTS_FILE)
    assert {r["task"] for r in rows} == {"rotate90", "invert"}
    assert {r["attacker"] for r in rows if r["task"] == "invert"} == {True}
    assert {r["attacker"] for r in rows if r["task"] == "rotate90"} == {False}
    # The attacker's update is minus its honest one (the honest one is in the client cache).
    honest, _ = local_train({**cfg.train_config(), "attack": "", "attackers": "", "compute-grad0": True},
                            2, strategy.theta0)
    attacker = strategy.clients[1]
    for k, v in strategy.theta0.items():
        torch.testing.assert_close(attacker.state[k] - v, -(honest[k] - v), rtol=1e-5, atol=1e-6)
    # fedavg of an update and the negated other: the mean of the two task vectors.
    tau0 = {k: strategy.clients[0].state[k] - v for k, v in strategy.theta0.items()}
    for k, v in strategy.theta0.items():
        torch.testing.assert_close(strategy.deltas["fedavg"][k], (tau0[k] + attacker.state[k] - v) / 2,
                                   rtol=1e-5, atol=1e-6)


def test_flwr_run_failure_is_reported(tmp_path, capsys):
    """flwr run exits 0 when the run fails: the launcher must read the status and fail, with
    the ServerApp's own error (read back from Flower) in its one line and in failure.json."""
    app = tmp_path / "app"
    app.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, app / name)
    for pkg in ("fl_merge", "clients", "strategies"):
        shutil.copytree(ROOT / pkg, app / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    server = app / "strategies" / "server_app.py"
    server.write_text(server.read_text() + "\n\ndef _broken(grid, context):\n"
                      "    raise RuntimeError('deliberately broken')\n\n"
                      "app = ServerApp()\napp.main()(_broken)\n")
    code = launch_main(["--app", str(app), "--run-config",
                        f'num-clients=2 output-dir="{tmp_path / "out"}"'])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = [x for x in err.splitlines() if x.startswith("fl-merge-run: error: ")]
    assert "ended as 'finished:failed': deliberately broken (log: " in line
    failure = json.loads((tmp_path / "out" / "failure.json").read_text())
    assert "ended as 'finished:failed': deliberately broken" in failure["reason"]
