"""A personal method (EMR) through the round, at the message level: every client receives its
OWN Delta (grid clients in their grid message, plain clients as their full model), the shared
methods' Delta stays one for all, rows say each task was scored on its own model, and the
options EMR cannot take are refused before any training."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, MessageType

from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.core.task_vectors import task_vector
from fl_merge.io.results import OWN_MODEL, format_summary
from fl_merge.round.scoring import delta_key
from fl_merge_strategies import OneShotMerge
from test_strategy import FakeGrid, _rich, _run, _standard, _theta0

pytestmark = pytest.mark.usefixtures("message_identity")


def _expected(replies, theta0, pids):
    """EMR of the clients' task vectors written out here (sign of the sum, 0 -> negative; the
    largest agreeing magnitude; per-tensor mean rescaler): client pid -> its own Delta."""
    taus = {p: task_vector(replies[100 + p]["arrays"].to_torch_state_dict(), theta0, list(theta0))
            for p in pids}
    out = {p: {} for p in pids}
    num = {p: 0.0 for p in pids}
    den = {p: 0.0 for p in pids}
    unified = {}
    for key in theta0:
        x = torch.stack([taus[p][key].double() for p in pids])
        s = torch.where(x.sum(0) > 0, 1.0, -1.0).double()
        agree = x * s > 0
        unified[key] = (s * torch.where(agree, x.abs(), 0.0).amax(0), agree)
        for j, p in enumerate(pids):
            num[p] += float(x[j].abs().mean())
            den[p] += float((unified[key][0] * agree[j]).abs().mean())
    for key, (uni, agree) in unified.items():
        for j, p in enumerate(pids):
            out[p][key] = (num[p] / den[p]) * uni * agree[j]
    return out


def test_each_client_receives_and_is_scored_on_its_own_model():
    replies = {100 + i: _rich(i, 10) for i in range(3)}
    grid = FakeGrid(replies)
    r = _run(OneShotMerge(methods=["task_arithmetic", "emr"], etas=[1.0, 2.0]), grid)
    theta0 = r.theta0
    want = _expected(replies, theta0, [0, 1, 2])
    grid_msgs = [m for m in grid.asked if m.metadata.message_type == MessageType.EVALUATE]
    assert grid_msgs
    seen_ta = []
    for m in grid_msgs:
        pid = m.metadata.dst_node_id - 100
        labels = list(m.content["config"]["delta-methods"])
        own = m.content[delta_key(labels.index("emr"))].to_torch_state_dict()
        for key in theta0:
            torch.testing.assert_close(own[key].double(), want[pid][key], rtol=1e-5, atol=1e-6)
        seen_ta.append(m.content[delta_key(labels.index("task_arithmetic"))].to_torch_state_dict())
    # the shared method's Delta is one and the same in every client's message
    assert all(torch.equal(d["backbone.w"], seen_ta[0]["backbone.w"]) for d in seen_ta)
    # the clients' models really differ (EMR is not one model)
    assert not torch.allclose(want[0]["backbone.w"], want[1]["backbone.w"])
    rows = [x for x in r.rows if x["model"] == "merged"]
    assert {x[OWN_MODEL] for x in rows if x["method"] == "emr"} == {True}
    assert {x[OWN_MODEL] for x in rows if x["method"] == "task_arithmetic"} == {False}
    assert "emr (eta=" in format_summary(r.rows) and "own model per task)" in format_summary(r.rows)
    # no one merged model; each client's is theta0 + eta * its own Delta
    with pytest.raises(ValueError, match="gives each client its own model"):
        r.merged_state(1.0, "emr")
    c1 = next(c for c in r.clients if c.partition_id == 1)
    got = r.merged_state(2.0, "emr", c1)
    torch.testing.assert_close(got["backbone.b"].double(), theta0["backbone.b"].double() + 2 * want[1]["backbone.b"])


def test_a_plain_client_gets_its_own_full_model():
    """Plain Flower clients (one full model per candidate): the emr candidate a client scores
    is theta0 + eta * its own Delta with its own head."""
    replies = {100 + i: _rich(i, 10, grid_eval=False) for i in range(2)}
    seen = []

    def plain(state, cfg):
        seen.append((cfg["candidate-method"], float(cfg["candidate-eta"]), state))
        return {"accuracy": 0.5, "loss": 0.0}

    grid = FakeGrid(replies, plain=plain)
    r = _run(OneShotMerge(method="emr", etas=[1.0]), grid)
    want = _expected(replies, r.theta0, [0, 1])
    emr_msgs = [m for m in grid.asked if m.metadata.message_type == MessageType.EVALUATE
                and m.content["config"]["candidate-method"] == "emr"]
    assert len(emr_msgs) == 4  # 2 clients x (val, test)
    for m in emr_msgs:
        pid = m.metadata.dst_node_id - 100
        state = m.content["arrays"].to_torch_state_dict()
        head = replies[100 + pid]["arrays"].to_torch_state_dict()["head.weight"]
        torch.testing.assert_close(state["head.weight"], head)
        for key in r.theta0:
            torch.testing.assert_close(state[key].double(), r.theta0[key].double() + want[pid][key],
                                       rtol=1e-5, atol=1e-6)


def test_one_client_emr_scores_its_own_fine_tuned_model():
    replies = {100: _rich(0, 10)}
    grid = FakeGrid(replies)
    one = {"min_available_nodes": 1, "min_train_nodes": 1, "min_evaluate_nodes": 1}  # Flower's default: 2
    r = _run(OneShotMerge(method="emr", etas=[1.0], **one), grid)
    tau = task_vector(replies[100]["arrays"].to_torch_state_dict(), r.theta0, list(r.theta0))
    got = r.merged_state(1.0, "emr", r.clients[0])
    for key in r.theta0:
        torch.testing.assert_close(got[key], r.theta0[key] + tau[key])


def test_a_personal_primary_returns_no_one_model_to_flower():
    s = OneShotMerge(method="emr", etas=[1.0])
    grid = FakeGrid({100 + i: _rich(i, 10) for i in range(2)})
    result = s.start(grid, ArrayRecord(_theta0()), train_config=None)
    assert len(result.arrays) == 0 and s.outcome.best_eta == 1.0


def test_num_examples_weighting_with_emr_is_refused_before_training():
    with pytest.raises(ValueError, match="^weighting=num-examples cannot apply to emr: it gives each client "
                                         "its own model"):
        OneShotMerge(methods=["fedavg", "emr"], weighting="num-examples")
    with pytest.raises(ConfigError, match="weighting=num-examples cannot apply to emr"):
        RunConfig.from_flower({"method": "emr", "weighting": "num-examples", "num-clients": 2,
                               "tasks": "rotate90,parity"}).resolve()
    # uniform is fine, and standard Flower clients (no partition ids) work too
    r = _run(OneShotMerge(method="emr", etas=[1.0]), FakeGrid({11: _standard(1.0, 5), 12: _standard(-2.0, 5)}))
    assert r.best_eta == 1.0
