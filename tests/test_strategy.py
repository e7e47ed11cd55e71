"""OneShotMerge as Flower glue, driven with hand-made reply Messages (no simulation)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.error import Error

from fl_merge import MergeInputError
from strategies import MergeRoundError, OneShotMerge


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """Instruction Messages read the run id of the process they are built in (set by Flower
    inside a real ServerApp)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def _reply(node_id: int, content: RecordDict | None = None, error: Error | None = None) -> Message:
    md = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                  reply_to_message_id="i", group_id="1", created_at=0.0, ttl=60.0,
                  message_type=MessageType.TRAIN)
    return Message(content, metadata=md) if error is None else Message(error, metadata=md)


def _theta0() -> dict[str, torch.Tensor]:
    return {"backbone.w": torch.zeros(3, 2), "backbone.b": torch.zeros(2)}


def _standard_reply(node_id: int, shift: float, n: int, classes: int = 4) -> Message:
    """What a plain Flower ClientApp sends: full weights + num-examples, nothing else ours."""
    state = {"backbone.w": torch.full((3, 2), shift), "backbone.b": torch.full((2,), -shift),
             "head.weight": torch.randn(classes, 2), "head.bias": torch.zeros(classes)}
    return _reply(node_id, RecordDict({"arrays": ArrayRecord(state),
                                       "metrics": MetricRecord({"num-examples": n, "train_loss": 0.1})}))


def test_standard_client_replies_merge_weighted_by_examples():
    s = OneShotMerge(method="fedavg", weighting="num-examples", etas=[1.0])
    s.theta0 = _theta0()
    arrays, metrics = s.aggregate_train(1, [_standard_reply(11, 1.0, 100), _standard_reply(12, 4.0, 300, 7)])
    expected = (100 * 1.0 + 300 * 4.0) / 400  # = 3.25
    torch.testing.assert_close(s.delta["backbone.w"], torch.full((3, 2), expected))
    torch.testing.assert_close(s.delta["backbone.b"], torch.full((2,), -expected))
    assert set(s.delta) == {"backbone.w", "backbone.b"}  # heads never merged
    merged = arrays.to_torch_state_dict()
    torch.testing.assert_close(merged["backbone.w"], torch.full((3, 2), expected))
    assert [c.per_task["head.weight"].shape[0] for c in s.clients] == [4, 7]
    assert [s.task_name(c) for c in s.clients] == ["node-11", "node-12"]


def test_uniform_weighting_is_the_plain_mean():
    s = OneShotMerge(method="task_arithmetic", etas=[1.0])
    s.theta0 = _theta0()
    s.aggregate_train(1, [_standard_reply(1, 1.0, 100), _standard_reply(2, 4.0, 300)])
    torch.testing.assert_close(s.delta["backbone.w"], torch.full((3, 2), 2.5))


def test_evaluate_messages_carry_own_head_delta_and_eta_grid():
    s = OneShotMerge(method="fedavg", etas=[2.0, 0.5])
    s.theta0 = _theta0()
    s.aggregate_train(1, [_standard_reply(1, 1.0, 10, classes=3), _standard_reply(2, 2.0, 10, classes=5)])
    msgs = list(s.configure_evaluate(1, ArrayRecord(s.theta0), ConfigRecord({"model": "m"}), grid=None))
    assert [m.metadata.dst_node_id for m in msgs] == [1, 2]
    for m, classes in zip(msgs, (3, 5)):
        assert m.metadata.message_type == MessageType.EVALUATE
        state = m.content["arrays"].to_torch_state_dict()
        assert state["head.weight"].shape[0] == classes
        torch.testing.assert_close(state["backbone.w"], torch.zeros(3, 2))  # theta0, not merged
        torch.testing.assert_close(m.content["delta"].to_torch_state_dict()["backbone.w"],
                                   torch.full((3, 2), 1.5))
        assert list(m.content["config"]["etas"]) == [0.0, 0.5, 2.0]


def test_failed_client_is_named_and_left_out():
    s = OneShotMerge(method="fedavg")
    s.theta0 = _theta0()
    s.aggregate_train(1, [_standard_reply(11, 1.0, 10), _standard_reply(13, 3.0, 10),
                          _reply(12, error=Error(code=0, reason="out of memory"))])
    assert [c.node_id for c in s.clients] == [11, 13]
    torch.testing.assert_close(s.delta["backbone.w"], torch.full((3, 2), 2.0))  # mean of 1 and 3
    assert s.failures == [{"client": "node 12", "node_id": 12, "partition_id": None, "stage": "train",
                           "reason": "out of memory"}]


def test_malformed_nan_and_silent_clients_are_left_out():
    s = OneShotMerge(method="median")
    s.theta0 = _theta0()
    s._train_nodes = [1, 2, 3, 4, 5]  # node 5 was asked but never replied
    nan = _standard_reply(3, 1.0, 10)
    nan.content["arrays"]["backbone.b"] = ArrayRecord({"x": torch.full((2,), float("nan"))})["x"]
    wrong = _standard_reply(4, 1.0, 10)
    wrong.content["arrays"]["backbone.w"] = ArrayRecord({"x": torch.zeros(6)})["x"]
    s.aggregate_train(1, [_standard_reply(1, 1.0, 10), _standard_reply(2, 5.0, 10), nan, wrong])
    assert [c.node_id for c in s.clients] == [1, 2]
    reasons = {f["node_id"]: f["reason"] for f in s.failures}
    assert "non-finite update in backbone.b" in reasons[3]
    assert "malformed update" in reasons[4] and "backbone.w" in reasons[4]
    assert "no reply" in reasons[5]
    torch.testing.assert_close(s.delta["backbone.w"], torch.full((3, 2), 3.0))


def test_too_few_usable_clients_is_one_clear_error():
    s = OneShotMerge(method="krum", method_params={"f": 1})  # needs 2f+3 = 5 clients
    s.theta0 = _theta0()
    replies = [_standard_reply(i, float(i), 10) for i in range(1, 5)]
    replies.append(_reply(9, error=Error(code=0, reason="killed")))
    with pytest.raises(MergeRoundError, match=r"method 'krum' cannot merge the 4 usable .*node 9: killed"):
        s.aggregate_train(1, replies)
    s = OneShotMerge(method="fedavg", min_clients=3)
    s.theta0 = _theta0()
    with pytest.raises(MergeRoundError, match=r"only 2 usable client update\(s\), need at least 3"):
        s.aggregate_train(1, [_standard_reply(1, 1.0, 10), _standard_reply(2, 1.0, 10),
                              _reply(3, error=Error(code=0, reason="boom"))])


def test_alie_attackers_collude_on_their_own_updates():
    from fl_merge.attacks import alie_z, parse_plan

    plan = parse_plan("alie", "2,3", "", "", 4)
    s = OneShotMerge(method="fedavg", attack_plan=plan, measure_heterogeneity=False)
    s.theta0 = _theta0()
    replies = [_rich_reply(100 + i, i, 10) for i in range(4)]
    honest = [{k: v.clone() for k, v in r.content["arrays"].to_torch_state_dict().items()} for r in replies]
    s.aggregate_train(1, replies)
    z = alie_z(4, 2)
    tau = {k: [honest[i][k] - s.theta0[k] for i in (2, 3)] for k in s.theta0}
    bad = {k: torch.stack(v).mean(0) - z * torch.stack(v).std(0, correction=0) for k, v in tau.items()}
    for k in s.theta0:
        expected = (honest[0][k] - s.theta0[k] + honest[1][k] - s.theta0[k] + 2 * bad[k]) / 4
        torch.testing.assert_close(s.delta[k], expected)


def test_bad_method_fails_at_construction_and_missing_steps_at_merge():
    with pytest.raises(MergeInputError, match="unknown merge method"):
        OneShotMerge(method="nope")
    with pytest.raises(ValueError, match="exactly one round"):
        OneShotMerge().start(grid=None, initial_arrays=ArrayRecord(_theta0()), num_rounds=3)
    s = OneShotMerge(method="fednova")
    s.theta0 = _theta0()
    # Standard replies carry no local-steps: FedNova cannot normalise and says so.
    with pytest.raises(MergeInputError, match="local_steps"):
        s.aggregate_train(1, [_standard_reply(1, 1.0, 10), _standard_reply(2, 2.0, 10)])


def _rich_reply(node_id: int, seed: int, steps: int) -> Message:
    """Our ClientApp's reply: weights, head, local-steps, partition id and a Fisher extra."""
    g = torch.Generator().manual_seed(seed)
    state = {"backbone.w": torch.randn(3, 2, generator=g), "backbone.b": torch.randn(2, generator=g),
             "head.weight": torch.randn(4, 2, generator=g), "head.bias": torch.zeros(4)}
    state.update({f"extra.fisher.{k}": torch.rand(v.shape, generator=g)
                  for k, v in state.items() if k.startswith("backbone.")})
    metrics = {"num-examples": 10 * (seed + 1), "local-steps": steps, "partition-id": seed}
    return _reply(node_id, RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}))


@pytest.mark.parametrize("method", __import__("fl_merge").available_methods())
def test_every_method_runs_through_the_strategy_as_merge_would(method):
    """The glue hands merge() the right task vectors, weights, local steps, names and extras."""
    from fl_merge import merge
    from fl_merge.task_vectors import split_extras, task_vector

    steps = [10, 20, 40, 80, 160, 320]
    replies = [_rich_reply(100 + i, i, s) for i, s in reversed(list(enumerate(steps)))]
    s = OneShotMerge(method=method, weighting="num-examples")
    s.theta0 = _theta0()
    s.aggregate_train(1, replies)
    # Independent: clients ordered by partition id, task vectors over the backbone only.
    states = [split_extras(r.content["arrays"].to_torch_state_dict()) for r in reversed(replies)]
    taus = [task_vector(w, s.theta0, list(s.theta0)) for w, _ in states]
    fisher = {"fisher": [e["fisher"] for _, e in states]}
    # clients are named by node and partition (DARE keys its masks by these names)
    names = [f"node {100 + i} (partition {i})" for i in range(6)]
    expected = merge(method, taus, weights=[10.0 * (i + 1) for i in range(6)], local_steps=steps,
                     names=names, extras=fisher if method == "fisher" else None)
    assert set(s.delta) == set(s.theta0)
    for k in s.theta0:
        torch.testing.assert_close(s.delta[k], expected[k])
        assert bool(torch.isfinite(s.delta[k]).all())


def test_fisher_merge_names_clients_without_fisher():
    s = OneShotMerge(method="fisher")
    s.theta0 = _theta0()
    with pytest.raises(MergeRoundError, match="needs 'fisher' from every client; missing from node 2"):
        s.aggregate_train(1, [_rich_reply(1, 0, 10), _standard_reply(2, 1.0, 10, classes=4)])


def _eval_reply(node_id: int, msg_config: ConfigRecord, score) -> Message:
    """What our ClientApp replies to an evaluate message: for each delta (method index i)
    and each eta of its grid, score(i, eta, split) on every requested split."""
    etas = [float(e) for e in msg_config["etas"]]
    counts = list(msg_config["etas-per-delta"])
    pairs = [(i, etas[sum(counts[:i]) + j]) for i, n in enumerate(counts) for j in range(n)]
    metrics = {"num-examples": 10, "partition-id": node_id - 100}
    for split in msg_config["splits"]:
        metrics[f"{split}-accuracy"] = [score(i, eta, split) for i, eta in pairs]
        metrics[f"{split}-loss"] = [0.0] * len(pairs)
    return _reply(node_id, RecordDict({"metrics": MetricRecord(metrics)}))


class _ScoringGrid:
    """A Grid whose nodes answer evaluate messages with `score` (records what was asked)."""

    def __init__(self, score):
        self.score, self.asked = score, []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.asked += messages
        return [_eval_reply(m.metadata.dst_node_id, m.content["config"], self.score) for m in messages]


def _three_methods_trained() -> OneShotMerge:
    s = OneShotMerge(methods=["fedavg", ("ties", {"density": 0.5}), ("ties", {"density": 1.0})],
                     etas=[1.0, 2.0])
    s.theta0 = _theta0()
    replies = [_rich_reply(100 + i, i, 10) for i in range(3)]
    for r in replies:
        r.content["metrics"]["finetuned-val-accuracy"] = 0.8
        r.content["metrics"]["finetuned-accuracy"] = 0.8
        r.content["metrics"]["finetuned-loss"] = 0.1
    s.aggregate_train(1, replies)
    return s


# etas [0, 1, 2]; each method has its own best eta on validation; test differs from val.
_VAL = [[0.5, 0.7, 0.6], [0.5, 0.6, 0.75], [0.5, 0.4, 0.3]]


def _score(i: int, eta: float, split: str) -> float:
    return _VAL[i][int(eta)] - (0.1 if split == "test" and eta > 0 else 0.0)


def test_several_methods_share_one_training_pass_and_one_evaluate_message():
    s = _three_methods_trained()
    assert list(s.methods) == ["fedavg", "ties[density=0.5]", "ties[density=1.0]"]
    assert s.methods["ties[density=0.5]"] == ("ties", {"density": 0.5})  # full parameters
    assert set(s.deltas) == set(s.methods)
    torch.testing.assert_close(s.delta["backbone.w"], s.deltas["fedavg"]["backbone.w"])
    grid = _ScoringGrid(_score)
    msgs = list(s.configure_evaluate(1, ArrayRecord(s.theta0), ConfigRecord({}), grid=grid))
    content = msgs[0].content
    assert list(content["config"]["delta-methods"]) == list(s.methods)
    assert list(content["config"]["splits"]) == ["val"]  # the eta grid is scored on val only
    assert list(content["config"]["etas"]) == [0.0, 1.0, 2.0] * 3
    for i, label in enumerate(s.methods):
        key = "delta" if i == 0 else f"delta-{i}"
        torch.testing.assert_close(content[key].to_torch_state_dict()["backbone.b"], s.deltas[label]["backbone.b"])
    metrics = s.aggregate_evaluate(1, [_eval_reply(m.metadata.dst_node_id, m.content["config"], _score)
                                       for m in msgs])
    assert s.best_etas == {"fedavg": 1.0, "ties[density=0.5]": 2.0, "ties[density=1.0]": 1.0}
    # The second message scores test at the base and each method's chosen eta only.
    assert len(grid.asked) == 3
    cfg = grid.asked[0].content["config"]
    assert list(cfg["splits"]) == ["test"]
    assert list(cfg["etas"]) == [0.0, 1.0, 0.0, 2.0, 0.0, 1.0]
    assert list(cfg["etas-per-delta"]) == [2, 2, 2]
    assert metrics["ties[density=0.5]-test-accuracy"] == pytest.approx(0.65)
    assert metrics["base-test-accuracy"] == pytest.approx(0.5)
    selected = [r for r in s.rows if r["selected"] and r["split"] == "val"]
    assert len(selected) == 3 * 3 and {r["method_name"] for r in selected} == {"fedavg", "ties"}
    test_rows = [r for r in s.rows if r["split"] == "test" and r["model"] != "finetuned"]
    assert sorted({r["eta"] for r in test_rows if r["method"] == "ties[density=0.5]"}) == [0.0, 2.0]
    assert len([r for r in s.rows if r["split"] == "val" and r["model"] != "finetuned"]) == 3 * 3 * 3


def test_test_all_etas_scores_test_in_the_first_message():
    s = _three_methods_trained()
    s.test_all_etas = True
    grid = _ScoringGrid(_score)
    msgs = list(s.configure_evaluate(1, ArrayRecord(s.theta0), ConfigRecord({}), grid=grid))
    assert list(msgs[0].content["config"]["splits"]) == ["val", "test"]
    metrics = s.aggregate_evaluate(1, [_eval_reply(m.metadata.dst_node_id, m.content["config"], _score)
                                       for m in msgs])
    assert grid.asked == []  # no second message
    assert s.best_etas["ties[density=0.5]"] == 2.0  # chosen on val, not on test
    assert metrics["ties[density=0.5]-test-accuracy"] == pytest.approx(0.65)
    test_rows = [r for r in s.rows if r["split"] == "test" and r["model"] != "finetuned"]
    assert len(test_rows) == 3 * 3 * 3


def test_missing_test_scores_name_the_client():
    s = _three_methods_trained()

    class _Silent(_ScoringGrid):
        def send_and_receive(self, messages, timeout=None):
            return [_reply(m.metadata.dst_node_id, RecordDict({"metrics": MetricRecord(
                {"num-examples": 10})})) for m in messages]

    msgs = list(s.configure_evaluate(1, ArrayRecord(s.theta0), ConfigRecord({}), grid=_Silent(_score)))
    with pytest.raises(MergeRoundError, match=r"no client returned test evaluation scores: "
                                              r"node 100 \(partition 0\): did not score"):
        s.aggregate_evaluate(1, [_eval_reply(m.metadata.dst_node_id, m.content["config"], _score)
                                 for m in msgs])


def test_client_failing_evaluation_is_left_out_of_the_results():
    s = _three_methods_trained()
    grid = _ScoringGrid(_score)
    msgs = list(s.configure_evaluate(1, ArrayRecord(s.theta0), ConfigRecord({}), grid=grid))
    replies = [_eval_reply(m.metadata.dst_node_id, m.content["config"], _score) for m in msgs[:2]]
    replies.append(_reply(msgs[2].metadata.dst_node_id, error=Error(code=0, reason="evaluation crashed")))
    metrics = s.aggregate_evaluate(1, replies)
    assert {r["partition_id"] for r in s.rows} == {0, 1}
    assert s.failures[-1]["client"] == "node 102 (partition 2)"
    assert s.failures[-1]["stage"] == "evaluation" and s.failures[-1]["reason"] == "evaluation crashed"
    assert metrics["ties[density=0.5]-test-accuracy"] == pytest.approx(0.65)
