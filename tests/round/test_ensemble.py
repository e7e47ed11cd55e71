"""The prediction ensemble (DiWA's ENS reference): the mean softmax against a hand/numpy
computation, the client's reply against an independent average of the K models' softmax on
a tiny model, the best single run chosen on validation, and one Flower round in the DiWA
setting whose ensemble row matches the ensemble the test computes itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch.utils.data import TensorDataset

from fl_merge.tasks.registry import TaskData
from fl_merge.merging.ensemble import best_member, mean_probabilities, probability_scores
from fl_merge.round import ensemble as ens
from fl_merge.round.tables import add_references


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_mean_probabilities_by_hand():
    # two members, one example, two classes: softmax([0, 0]) = [.5, .5];
    # softmax([log 3, 0]) = [.75, .25]; their mean [.625, .375]
    got = mean_probabilities([torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])])
    torch.testing.assert_close(got, torch.tensor([[0.625, 0.375]], dtype=torch.float64))
    with pytest.raises(ValueError, match="same examples and classes"):
        mean_probabilities([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="at least one member"):
        mean_probabilities([])


def test_the_ensemble_is_not_the_majority_vote_nor_the_mean_logit():
    # member A is confident in class 0, members B and C mildly prefer class 1: the mean
    # softmax picks 0 (0.98 + 2 x 0.4 vs 0.02 + 2 x 0.6), the majority vote picks 1
    a = torch.tensor([[math.log(49.0), 0.0]])  # softmax [0.98, 0.02]
    b = torch.tensor([[0.0, math.log(1.5)]])  # softmax [0.4, 0.6]
    p = mean_probabilities([a, b, b])
    torch.testing.assert_close(p, torch.tensor([[1.78 / 3, 1.22 / 3]], dtype=torch.float64))
    acc, nll, right = probability_scores(p, torch.tensor([0]))
    assert right == [1] and acc == 1.0 and nll == pytest.approx(-math.log(1.78 / 3))


def test_probability_scores_and_a_zero_probability():
    p = torch.tensor([[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]], dtype=torch.float64)
    acc, nll, right = probability_scores(p, torch.tensor([1, 1, 0]))
    assert right == [1, 0, 1] and acc == pytest.approx(2 / 3)
    assert nll == pytest.approx(-(math.log(0.8) + math.log(0.4) + math.log(1.0)) / 3)
    assert probability_scores(p, torch.tensor([1, 1, 1]))[1] == math.inf
    with pytest.raises(ValueError, match="one probability row per label"):
        probability_scores(p, torch.tensor([1]))


def test_best_member_is_the_highest_validation_score_lowest_index_on_ties():
    assert best_member([0.7, 0.9, 0.9, 0.1]) == 1
    assert best_member([math.nan, 0.2]) == 1
    with pytest.raises(ValueError, match="no member has a validation score"):
        best_member([math.nan])


def test_member_criterion_is_the_mean_normalized_validation_accuracy():
    val = {"a": [0.8, 0.6], "b": [0.5, 0.9]}
    got = ens.member_criterion(val, {"a": 0.8, "b": 1.0})
    assert got == pytest.approx([(1.0 + 0.5) / 2, (0.75 + 0.9) / 2])
    # a task without its fine-tuned accuracy: raw accuracy for all
    assert ens.member_criterion(val, {"a": 0.8, "b": None}) == pytest.approx([0.65, 0.75])


def _tiny_task(seed: int = 0) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    def split(n):
        return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    return TaskData("tiny", 3, split(8), split(7), split(9))


def _linear(state):
    model = torch.nn.Linear(4, 3)
    model.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    return model


def test_client_reply_equals_an_independent_average_of_the_members_softmax():
    from fl_merge_clients.ensemble import answer

    task = _tiny_task()
    g = torch.Generator().manual_seed(1)
    theta0 = {"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}
    taus = [{"weight": 2 * torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)} for _ in range(3)]
    content = RecordDict({"arrays": ArrayRecord(theta0),
                          **{f"{ens.MEMBER_PREFIX}{i}": ArrayRecord(t) for i, t in enumerate(taus)},
                          "config": ConfigRecord(ens.request_config(3))})
    got = answer(content, task, _linear)
    for split, ds in (("val", task.val), ("test", task.test)):
        x, y = ds.tensors[0].numpy().astype(np.float64), ds.tensors[1].numpy()
        probs = []
        for t in taus:  # logits = x W^T + b of theta0 + tau, in numpy
            w = (theta0["weight"] + t["weight"]).numpy().astype(np.float64)
            b = (theta0["bias"] + t["bias"]).numpy().astype(np.float64)
            probs.append(_np_softmax(x @ w.T + b))
        p = np.mean(probs, axis=0)
        right = (p.argmax(1) == y).astype(int)
        assert got[f"{split}-accuracy"] == pytest.approx(right.mean())
        assert got[f"{split}-loss"] == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-5)
        if split == "test":
            assert got["test-correct"] == right.tolist()
            members = [(q.argmax(1) == y).astype(int).tolist() for q in probs]
            assert got[ens.MEMBER_CORRECT] == [v for m in members for v in m]
        else:
            assert got[ens.MEMBER_ACCURACY] == pytest.approx([(q.argmax(1) == y).mean() for q in probs])
    parsed = ens.parse_reply(got, 3)
    assert len(parsed["member-test-correct"]) == 3 and parsed["test"]["correct"] == got["test-correct"]
    with pytest.raises(ValueError, match="'member-val-accuracy' \\(2 values\\)"):
        ens.parse_reply(got, 2)
    with pytest.raises(ValueError, match="lacks \\['member-2'\\]"):
        del content["member-2"]
        answer(content, task, _linear)


def test_outcome_keeps_the_best_single_run_chosen_on_validation_only():
    # member 1 is best on validation, member 0 on test: the best single run is member 1
    reply = {"val": {"accuracy": 0.9, "loss": 0.3}, "test": {"accuracy": 0.5, "loss": 0.7, "correct": [1, 0]},
             "member-val": [0.6, 0.8], "member-test-correct": [[1, 1], [0, 1]]}
    got = ens.outcome({"t0": reply, "t1": reply}, {"t0": 1.0, "t1": 1.0}, ["t0", "t1"])
    assert got["best"] == 1 and got["best-name"] == "t1"
    single = got["scores"]["best-single"]["t0"]
    assert single["test"]["correct"] == [0, 1] and single["test"]["accuracy"] == 0.5
    assert single["val"]["accuracy"] == 0.8
    assert got["scores"]["ensemble"]["t1"]["test"]["correct"] == [1, 0]


def test_references_join_the_paired_comparison_only_on_the_same_examples():
    preds = {"task_arithmetic": {"a": [1, 0, 1]}, "base": {"a": [0, 0, 1]}}
    assert add_references(preds, {"ensemble": {"a": [1, 1, 1]}}) == []
    assert preds["ensemble"] == {"a": [1, 1, 1]}
    note = add_references(preds, {"best-single": {"a": [1, 1]}})
    assert "best-single scored other test examples" in note[0] and "best-single" not in preds


@pytest.fixture(scope="module")
def diwa(tmp_path_factory):
    from fl_merge.config.run_config import RunConfig
    from simulate import simulate_round

    out = tmp_path_factory.mktemp("diwa")
    cfg = RunConfig.from_flower({
        "num-clients": 2, "data": "shared", "partition-task": "rotate90", "partition-pool": 1000,
        "local-steps": "20,40", "lr": "0.005,0.02", "method": "task_arithmetic", "search": "off",
        "etas": "1", "ensemble": True, "cache": False, "output-dir": str(out),
    }).resolve()
    return simulate_round(cfg, 2), out


def test_diwa_round_scores_the_ensemble_the_test_computes_itself(diwa):
    from fl_merge.tasks.partitions import load_partitioned_task
    from fl_merge_clients.training import model_for_task

    r, out = diwa
    assert r.ensemble["members"] == ["rotate90/0", "rotate90/1"]
    task = load_partitioned_task("rotate90", "shared", 2, 0, 0.5, 2, 0, 1000)
    x, y = task.test.tensors
    probs, member_acc = [], []
    for c in r.clients:
        state = {**r.theta0, **c.state}  # the client's own fine-tuned model
        model = model_for_task("mnist-cnn", task, state, 0, "cpu").eval()
        with torch.no_grad():
            probs.append(torch.softmax(model(x).double(), 1).numpy())
        member_acc.append(float((probs[-1].argmax(1) == y.numpy()).mean()))
    expected = float((np.mean(probs, 0).argmax(1) == y.numpy()).mean())
    rows = [x for x in r.rows if x["model"] == "ensemble" and x["split"] == "test"]
    assert {x["task"] for x in rows} == {"rotate90/0", "rotate90/1"}
    assert all(x["accuracy"] == pytest.approx(expected) for x in rows)
    assert expected > 0.5  # 10 digit classes: far above chance (0.1)
    assert r.metrics["ensemble-test-accuracy"] == pytest.approx(expected)
    # the best single run is one of the members; its test accuracy is that member's
    assert r.ensemble["best-single"] in r.ensemble["members"]
    best = r.ensemble["members"].index(r.ensemble["best-single"])
    assert r.metrics["best-single-test-accuracy"] == pytest.approx(member_acc[best])
    # per-example correctness joins the paired bootstrap against Task Arithmetic
    models = {c["model"] for c in r.comparison}
    assert {"ensemble", "best-single", "task_arithmetic", "base"} <= models
    run = json.loads((out / "run.json").read_text())
    # each client got theta0 and the K = 2 task vectors: about three models' float32 bytes
    model_bytes = sum(v.numel() * v.element_size() for v in r.theta0.values())
    assert 2.9 * model_bytes < run["ensemble"]["bytes"]["per-client"] < 3.2 * model_bytes
    from fl_merge.engine.replicates import run_accuracies

    _, acc = run_accuracies(out)
    assert acc["ensemble"] == pytest.approx(expected) and acc["best-single"] == pytest.approx(member_acc[best])


def test_a_test_set_every_client_shares_is_resampled_once():
    from fl_merge.round.tables import comparison_rows, one_test_set
    from fl_merge.stats.intervals import bootstrap_ci

    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 200).tolist()
    b = rng.integers(0, 2, 200).tolist()
    shared = {"ta": {"t/0": a, "t/1": a, "t/2": a, "t/3": a}, "ens": {"t/0": b, "t/1": b, "t/2": b, "t/3": b}}
    assert one_test_set(shared) == {"ta": {"t/0": a}, "ens": {"t/0": b}}
    # different lists on different tasks (one task per client): nothing changes
    own = {"ta": {"x": a, "y": b}, "ens": {"x": b, "y": b}}
    assert one_test_set(own) == own
    # the CI is that of the one test set (4 independent resamples of the copies would be
    # about half as wide: sqrt(4))
    rows = {r["model"]: r for r in comparison_rows(shared, "ta")}
    one = bootstrap_ci({"ta": {"t": a}, "ens": {"t": b}}, "ta")
    assert rows["ens"]["ci_low"] == one["ens"]["low"] and rows["ens"]["diff_high"] == one["ens"]["diff_high"]
    copies = bootstrap_ci(shared, "ta")
    width = lambda r: r["high"] - r["low"]
    assert width(copies["ens"]) < 0.7 * width(one["ens"])
