"""OneShotMerge's Flower part and the round's sequence (strategies.merge_round.run_round),
driven through a fake Grid that answers with hand-made reply Messages (no simulation)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error

from fl_merge import MergeInputError
from fl_merge.methods import get_method
from fl_merge_strategies import MergeRoundError, OneShotMerge
from fl_merge_strategies.merge_round import run_round


# Instruction Messages read the run id of the process they are built in (conftest.py).
pytestmark = pytest.mark.usefixtures("message_identity")


def _theta0() -> dict[str, torch.Tensor]:
    return {"backbone.w": torch.zeros(3, 2), "backbone.b": torch.zeros(2)}


def _standard(shift: float, n: int, classes: int = 4) -> RecordDict:
    """What a plain Flower ClientApp sends: full weights + num-examples, nothing else ours."""
    state = {"backbone.w": torch.full((3, 2), shift), "backbone.b": torch.full((2,), -shift),
             "head.weight": torch.randn(classes, 2), "head.bias": torch.zeros(classes)}
    return RecordDict({"arrays": ArrayRecord(state),
                       "metrics": MetricRecord({"num-examples": n, "train_loss": 0.1})})


def _rich(seed: int, steps: int, grid_eval: bool = True) -> RecordDict:
    """Our ClientApp's reply: weights, head, local-steps, partition id, fine-tuned scores,
    a Fisher extra, a Gram of backbone.w's inputs (regmean) and the grid capability."""
    g = torch.Generator().manual_seed(seed)
    state = {"backbone.w": torch.randn(3, 2, generator=g), "backbone.b": torch.randn(2, generator=g),
             "head.weight": torch.randn(4, 2, generator=g), "head.bias": torch.zeros(4)}
    state.update({f"extra.fisher.{k}": torch.rand(v.shape, generator=g)
                  for k, v in state.items() if k.startswith("backbone.")})
    x = torch.randn(5, 2, generator=g)
    state["extra.gram.backbone.w"] = x.T @ x / 5
    metrics = {"num-examples": 10 * (seed + 1), "local-steps": steps, "partition-id": seed,
               "finetuned-val-accuracy": 0.8, "finetuned-accuracy": 0.8, "finetuned-loss": 0.1}
    if grid_eval:
        metrics["fl-merge-protocol"] = 1
    return RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})


# etas [0, 1, 2]; each method has its own best eta on validation; test differs from val.
_VAL = [[0.5, 0.7, 0.6], [0.5, 0.6, 0.75], [0.5, 0.4, 0.3]]


def _score(i: int, eta: float, split: str) -> float:
    return _VAL[i][int(eta)] - (0.1 if split == "test" and eta > 0 else 0.0)


class FakeGrid:
    """Nodes answer train messages with `train[node]` (a RecordDict, an Error, or None for
    silence), grid evaluate messages with `score(method index, eta, split)`, and plain
    evaluate messages with `plain(state, config)`. Every message sent is kept in `asked`."""

    def __init__(self, train, score=_score, plain=None, evaluate=None):
        self.train, self.score, self.asked = train, score, []
        self.plain = plain or (lambda state, cfg: {"accuracy": 0.5, "loss": 0.0})
        self.evaluate = evaluate  # node -> callable(message) -> reply content or Error, optional
        self.ready, self.pulls = {}, []  # push/pull: replies not yet pulled, ids of each pull

    def get_node_ids(self):
        return list(self.train)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{len(self.asked)}"
            self.asked.append(m)
            content = self._answer(m)
            if content is not None:
                out.append(Message(content, reply_to=m))
        return out

    def push_messages(self, messages):
        """Flower's Grid.push_messages (the spilling path pushes, then pulls each reply)."""
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{len(self.asked)}"
            self.asked.append(m)
            ids.append(m.metadata.message_id)
            content = self._answer(m)
            if content is not None:  # a fresh copy: what Flower inflates for each pull
                self.ready[m.metadata.message_id] = Message(_copy(content), reply_to=m)
        return ids

    def pull_messages(self, message_ids):
        ids = list(message_ids)
        self.pulls.append(ids)
        return [self.ready.pop(i) for i in ids if i in self.ready]

    def _answer(self, m):
        node = m.metadata.dst_node_id
        if m.metadata.message_type == MessageType.TRAIN:
            return self.train[node]
        if self.evaluate and node in self.evaluate:
            return self.evaluate[node](m)
        cfg = m.content["config"]
        if "delta" not in m.content:
            state = m.content["arrays"].to_torch_state_dict()
            return RecordDict({"metrics": MetricRecord(self.plain(state, cfg))})
        etas = [float(e) for e in cfg["etas"]]
        counts = list(cfg["etas-per-delta"])
        pairs = [(i, etas[sum(counts[:i]) + j]) for i, n in enumerate(counts) for j in range(n)]
        metrics = {"num-examples": 10}
        for split in cfg["splits"]:
            metrics[f"{split}-accuracy"] = [self.score(i, eta, split) for i, eta in pairs]
            metrics[f"{split}-loss"] = [0.0] * len(pairs)
        return RecordDict({"metrics": MetricRecord(metrics)})


def _copy(content):
    if isinstance(content, Error):
        return content
    return RecordDict({k: ArrayRecord(v.to_torch_state_dict()) if isinstance(v, ArrayRecord) else v
                       for k, v in content.items()})


def _run(strategy, grid, theta0=None):
    return run_round(strategy, grid, theta0 or _theta0(), {}, {"model": "m"}, 10.0)


def test_standard_client_replies_merge_weighted_by_examples():
    s = OneShotMerge(method="fedavg", weighting="num-examples", etas=[1.0])
    r = _run(s, FakeGrid({11: _standard(1.0, 100), 12: _standard(4.0, 300, 7)}))
    expected = (100 * 1.0 + 300 * 4.0) / 400  # = 3.25
    torch.testing.assert_close(r.delta["backbone.w"], torch.full((3, 2), expected))
    torch.testing.assert_close(r.delta["backbone.b"], torch.full((2,), -expected))
    assert set(r.delta) == {"backbone.w", "backbone.b"}  # heads never merged
    torch.testing.assert_close(r.merged_state(1.0)["backbone.w"], torch.full((3, 2), expected))
    assert [c.per_task["head.weight"].shape[0] for c in r.clients] == [4, 7]
    assert [r.task_name(c) for c in r.clients] == ["node-11", "node-12"]


def test_the_round_logs_each_phase_with_seconds_into_the_round(caplog):
    import logging

    from fl_merge.round.clock import PHASE_PATTERN

    with caplog.at_level(logging.INFO, logger="flwr"):
        _run(OneShotMerge(method="fedavg", etas=[0.5, 1.0]),
             FakeGrid({1: _standard(1.0, 10), 2: _standard(2.0, 10)}))
    marks = [m.groups() for m in map(PHASE_PATTERN.search, caplog.messages) if m]
    assert [name for name, _ in marks] == ["train", "aggregate", "validation", "test"]
    seconds = [float(s) for _, s in marks]
    assert seconds == sorted(seconds) and seconds[-1] < 60  # elapsed, not an epoch timestamp (~1.7e9)
    assert any("(validation took" in m for m in caplog.messages if "phase test" in m)


def test_a_chosen_eta_at_the_edge_of_its_grid_is_named_in_the_notes_and_the_summary():
    from fl_merge.io.results import format_summary

    clients = {101: _rich(0, 10), 102: _rich(1, 10)}  # grid clients: they score with `score`
    rising = FakeGrid(clients, score=lambda i, eta, split: 0.5 + 0.1 * eta)  # best at the top
    r = _run(OneShotMerge(method="fedavg", etas=[0.5, 1.0, 2.0], measure_heterogeneity=False), rising)
    assert r.best_etas["fedavg"] == 2.0
    edge = [n for n in r.notes if "is the largest of the 3 tried (0.5..2)" in n]
    assert len(edge) == 1 and edge[0].startswith("fedavg: the chosen eta=2")
    assert f"warning: {edge[0]}" in format_summary(r.rows).splitlines()
    peaked = FakeGrid(clients, score=lambda i, eta, split: 0.9 - abs(eta - 1.0) / 4)  # best inside
    r = _run(OneShotMerge(method="fedavg", etas=[0.5, 1.0, 2.0], measure_heterogeneity=False), peaked)
    assert r.best_etas["fedavg"] == 1.0 and not any("tried" in n for n in r.notes)
    assert "warning:" not in format_summary(r.rows)


def test_median_of_two_clients_is_fedavg_and_the_round_says_so():
    r = _run(OneShotMerge(methods=["fedavg", "median"], etas=[1.0], measure_heterogeneity=False),
             FakeGrid({1: _standard(1.0, 10), 2: _standard(4.0, 30)}))
    torch.testing.assert_close(r.deltas["median"]["backbone.w"], r.deltas["fedavg"]["backbone.w"])
    assert [n for n in r.notes if n.startswith("median = fedavg by construction at K=2")]


def test_uniform_weighting_is_the_plain_mean():
    r = _run(OneShotMerge(method="task_arithmetic", etas=[1.0]),
             FakeGrid({1: _standard(1.0, 100), 2: _standard(4.0, 300)}))
    torch.testing.assert_close(r.delta["backbone.w"], torch.full((3, 2), 2.5))


def test_train_message_carries_theta0_protocol_version_and_merge_keys():
    grid = FakeGrid({1: _standard(1.0, 10), 2: _standard(2.0, 10)})
    _run(OneShotMerge(method="fedavg", merge_keys="backbone.*,other.*"), grid)
    train = [m for m in grid.asked if m.metadata.message_type == MessageType.TRAIN]
    assert sorted(m.metadata.dst_node_id for m in train) == [1, 2]
    cfg = train[0].content["config"]
    assert cfg["fl-merge-protocol"] == 1 and list(cfg["merge-keys"]) == ["backbone.*", "other.*"]
    assert cfg["compute-grad0"] is True and "compute-fisher" not in cfg
    sent = train[0].content["arrays"].to_torch_state_dict()
    torch.testing.assert_close(sent["backbone.w"], torch.zeros(3, 2))


def test_grid_evaluate_messages_carry_own_head_delta_and_eta_grid():
    s = OneShotMerge(method="fedavg", etas=[2.0, 0.5])
    grid = FakeGrid({101: _rich(0, 10), 102: _rich(1, 10)})
    r = _run(s, grid)
    ev = [m for m in grid.asked if m.metadata.message_type == MessageType.EVALUATE]
    first = ev[:2]  # one validation message per client, then one test message per client
    assert len(ev) == 4 and sorted(m.metadata.dst_node_id for m in first) == [101, 102]
    for m in first:
        c = next(c for c in r.clients if c.node_id == m.metadata.dst_node_id)
        state = m.content["arrays"].to_torch_state_dict()
        torch.testing.assert_close(state["head.weight"], c.state["head.weight"])  # its own head
        torch.testing.assert_close(state["backbone.w"], torch.zeros(3, 2))  # theta0, not merged
        mean_w = (r.clients[0].state["backbone.w"] + r.clients[1].state["backbone.w"]) / 2
        torch.testing.assert_close(m.content["delta"].to_torch_state_dict()["backbone.w"], mean_w)
        assert list(m.content["config"]["etas"]) == [0.0, 0.5, 2.0]
        assert m.content["config"]["model"] == "m" and m.content["config"]["fl-merge-protocol"] == 1


def test_plain_clients_get_one_model_per_candidate_and_report_accuracy():
    """Clients without the grid capability score full models: the base once, each method's
    eta once, on the split named in config; the scores land in the same rows."""
    seen = []

    def plain(state, cfg):  # accuracy = the sent backbone.w value, so it identifies the model
        seen.append((cfg["split"], cfg["candidate-method"], cfg["candidate-eta"], state))
        return {"accuracy": float(state["backbone.w"][0, 0]) / 10 + (0.05 if cfg["split"] == "test" else 0),
                "loss": 1.0}

    s = OneShotMerge(methods=["fedavg", "median"], etas=[1.0, 2.0], measure_heterogeneity=False)
    grid = FakeGrid({1: _standard(1.0, 10, classes=3), 2: _standard(3.0, 10, classes=5)}, plain=plain)
    r = _run(s, grid)
    # validation: base + 2 methods x 2 etas = 5 per client; test: base + each method's choice = 3
    assert sorted((sp, m, e) for sp, m, e, _ in seen if sp == "val") == sorted(
        [("val", "base", 0.0), ("val", "fedavg", 1.0), ("val", "fedavg", 2.0),
         ("val", "median", 1.0), ("val", "median", 2.0)] * 2)
    assert len([x for x in seen if x[0] == "test"]) == 2 * 3
    for _, method, eta, state in seen:  # theta0 + eta * Delta, with the client's own head
        assert state["backbone.w"][0, 0].item() == pytest.approx(eta * 2.0)  # both Deltas are 2
        assert state["head.weight"].shape[0] in (3, 5)
    assert r.best_etas == {"fedavg": 2.0, "median": 2.0}  # raw validation accuracy 0.4 > 0.2
    assert r.selection == "mean validation accuracy"
    assert r.notes and "node-1, node-2 sent no finetuned-val-accuracy" in r.notes[0]
    chosen = [row for row in r.rows if row["selected"] and row["split"] == "test"]
    assert [row["accuracy"] for row in chosen] == pytest.approx([0.45] * 4)
    assert all(math.isnan(row["normalized_accuracy"]) for row in chosen)
    assert not [row for row in r.rows if row["model"] == "finetuned"]  # none reported
    assert math.isnan(r.metrics["fedavg-normalized-accuracy"])
    assert r.metrics["fedavg-test-accuracy"] == pytest.approx(0.45)
    assert r.metrics["base-test-accuracy"] == pytest.approx(0.05)


def test_grid_and_plain_clients_in_one_round_give_the_same_table():
    """A plain client answering what a grid client would is indistinguishable in the rows."""
    def plain(state, cfg):
        return {"accuracy": _score(0, cfg["candidate-eta"], cfg["split"]), "loss": 0.0}

    grid = FakeGrid({100: _rich(0, 10), 101: _rich(1, 10, grid_eval=False)}, plain=plain)
    r = _run(OneShotMerge(method="fedavg", etas=[1.0, 2.0]), grid)
    assert [c.grid_eval for c in r.clients] == [True, False]
    by_task = {}
    for row in r.rows:
        by_task.setdefault(row["task"], []).append((row["model"], row["eta"], row["split"], row["accuracy"]))
    a, b = by_task["client-0"], by_task["client-1"]
    assert [x[1:] for x in a if x[0] != "finetuned"] == [x[1:] for x in b if x[0] != "finetuned"]
    assert r.best_etas == {"fedavg": 1.0} and r.selection == "mean normalized validation accuracy"


def test_failed_client_is_named_and_left_out():
    r = _run(OneShotMerge(method="fedavg"), FakeGrid(
        {11: _standard(1.0, 10), 13: _standard(3.0, 10), 12: Error(code=0, reason="out of memory")}))
    assert [c.node_id for c in r.clients] == [11, 13]
    torch.testing.assert_close(r.delta["backbone.w"], torch.full((3, 2), 2.0))  # mean of 1 and 3
    assert r.failures == [{"client": "node 12", "node_id": 12, "partition_id": None, "stage": "train",
                           "reason": "out of memory", "task": None}]
    assert r.missing_tasks == []  # these clients do not say their partition: nothing to guess


def test_malformed_nan_silent_and_unweighted_clients_are_left_out():
    nan = _standard(1.0, 10)
    nan["arrays"]["backbone.b"] = ArrayRecord({"x": torch.full((2,), float("nan"))})["x"]
    wrong = _standard(1.0, 10)
    wrong["arrays"]["backbone.w"] = ArrayRecord({"x": torch.zeros(6)})["x"]
    no_n = _standard(1.0, 10)
    del no_n["metrics"]["num-examples"]
    r = _run(OneShotMerge(method="median"), FakeGrid(
        {1: _standard(1.0, 10), 2: _standard(5.0, 10), 3: nan, 4: wrong, 5: None, 6: no_n}))
    assert [c.node_id for c in r.clients] == [1, 2]
    reasons = {f["node_id"]: f["reason"] for f in r.failures}
    assert "non-finite update in backbone.b" in reasons[3]
    assert "malformed update" in reasons[4] and "backbone.w" in reasons[4]
    assert "no reply" in reasons[5]
    assert reasons[6] == "node 6 sent no 'num-examples' metric"
    torch.testing.assert_close(r.delta["backbone.w"], torch.full((3, 2), 3.0))


def test_too_few_usable_clients_is_one_clear_error():
    s = OneShotMerge(method="krum", method_params={"f": 1})  # needs 2f+3 = 5 clients
    train = {i: _standard(float(i), 10) for i in range(1, 5)}
    train[9] = Error(code=0, reason="killed")
    with pytest.raises(MergeRoundError, match=r"method 'krum' cannot merge the 4 usable .*node 9: killed"):
        _run(s, FakeGrid(train))
    with pytest.raises(MergeRoundError, match=r"only 2 usable client update\(s\), need at least 3"):
        _run(OneShotMerge(method="fedavg", min_clients=3), FakeGrid(
            {1: _standard(1.0, 10), 2: _standard(1.0, 10), 3: Error(code=0, reason="boom")}))


def test_alie_attackers_collude_on_their_own_updates():
    from fl_merge.round.attacks import alie_z, parse_plan

    plan = parse_plan("alie", "2,3", "", "", 4)
    replies = {100 + i: _rich(i, 10) for i in range(4)}
    honest = [{k: v.clone() for k, v in replies[100 + i]["arrays"].to_torch_state_dict().items()}
              for i in range(4)]
    r = _run(OneShotMerge(method="fedavg", attack_plan=plan, measure_heterogeneity=False), FakeGrid(replies))
    z = alie_z(4, 2)
    theta0 = _theta0()
    tau = {k: [honest[i][k] - theta0[k] for i in (2, 3)] for k in theta0}
    bad = {k: torch.stack(v).mean(0) - z * torch.stack(v).std(0, correction=0) for k, v in tau.items()}
    for k in theta0:
        expected = (honest[0][k] - theta0[k] + honest[1][k] - theta0[k] + 2 * bad[k]) / 4
        torch.testing.assert_close(r.delta[k], expected)


def test_bad_method_fails_at_construction_and_missing_steps_at_merge():
    with pytest.raises(MergeInputError, match="unknown merge method"):
        OneShotMerge(method="nope")
    with pytest.raises(ValueError, match="exactly one round"):
        OneShotMerge().start(grid=None, initial_arrays=ArrayRecord(_theta0()), num_rounds=3)
    with pytest.raises(ValueError, match="evaluate_fn is not used"):
        OneShotMerge().start(grid=None, initial_arrays=ArrayRecord(_theta0()), evaluate_fn=print)
    # Standard replies carry no local-steps: FedNova cannot normalise and says so.
    with pytest.raises(MergeInputError, match="local_steps"):
        _run(OneShotMerge(method="fednova"), FakeGrid({1: _standard(1.0, 10), 2: _standard(2.0, 10)}))


@pytest.mark.parametrize("method", [m for m in __import__("fl_merge").available_methods()
                                    if not get_method(m).personal])
def test_every_method_runs_through_the_round_as_merge_would(method):
    """The round hands merge() the right task vectors, weights, local steps and extras.
    (A personal method, EMR, takes no weights and gives one model per client: test_personal.py.)"""
    from fl_merge import merge
    from fl_merge.core.task_vectors import split_extras, task_vector
    from fl_merge.merging.registry import check_method_params, get_method

    try:
        check_method_params(method, {}, 6)
        n = 6
    except MergeInputError:
        n = 2  # slerp: exactly two models
    steps = [10, 20, 40, 80, 160, 320][:n]
    replies = {100 + i: _rich(i, s) for i, s in reversed(list(enumerate(steps)))}
    r = _run(OneShotMerge(method=method, weighting="num-examples", etas=[1.0]), FakeGrid(replies))
    # Independent: clients ordered by partition id, task vectors over the backbone only.
    states = [split_extras(replies[100 + i]["arrays"].to_torch_state_dict()) for i in range(n)]
    taus = [task_vector(w, r.theta0, list(r.theta0)) for w, _ in states]
    needed = {name: [e[name] for _, e in states] for name in get_method(method).needs.extras}
    # Clients are identified by partition (DARE keys its masks by it, stable across runs).
    names = [f"partition {i}" for i in range(n)]
    # slerp and karcher are defined on the models theta0 + tau_i: the round passes theta0
    base = dict(r.theta0) if get_method(method).needs.theta0 else None
    expected = merge(method, taus, weights=[10.0 * (i + 1) for i in range(n)], local_steps=steps,
                     names=names, extras=needed or None, theta0=base)
    assert set(r.delta) == set(r.theta0)
    for k in r.theta0:
        torch.testing.assert_close(r.delta[k], expected[k])
        assert bool(torch.isfinite(r.delta[k]).all())


def test_fednova_uses_the_normalisers_clients_report():
    """A client's reported fednova-a is its normaliser; Delta = a_eff * sum p_i tau_i / a_i,
    checked against that formula written out here (not merge())."""
    from fl_merge.core.task_vectors import task_vector

    replies = {100 + i: _rich(i, 10) for i in range(3)}
    a = [2.0, 5.0, 11.0]  # reported normalisers; the 10 local steps each would weigh all alike
    for i, ai in enumerate(a):
        replies[100 + i]["metrics"]["fednova-a"] = ai
    r = _run(OneShotMerge(method="fednova", etas=[1.0]), FakeGrid(replies))
    taus = [task_vector(replies[100 + i]["arrays"].to_torch_state_dict(), r.theta0, list(r.theta0))
            for i in range(3)]
    a_eff = sum(a) / 3
    for k in r.theta0:
        expected = a_eff * sum(t[k] / ai for t, ai in zip(taus, a)) / 3
        torch.testing.assert_close(r.delta[k], expected)
    assert not any("by construction" in n for n in r.notes)
    # equal normalisers: fednova is fedavg by construction, and the run's notes say so
    for rep in replies.values():
        rep["metrics"]["fednova-a"] = 4.0
    r = _run(OneShotMerge(method="fednova", etas=[1.0]), FakeGrid(replies))
    assert any("fednova = fedavg by construction" in n for n in r.notes), r.notes


def test_fisher_merge_names_clients_without_fisher():
    grid = FakeGrid({1: _rich(0, 10), 2: _standard(1.0, 10, classes=4)})
    with pytest.raises(MergeRoundError, match=r"needs 'fisher' from every client; missing from node 2"):
        _run(OneShotMerge(method="fisher"), grid)
    assert grid.asked[0].content["config"]["compute-fisher"] is True


def _three_methods(test_all_etas: bool = False) -> OneShotMerge:
    return OneShotMerge(methods=["fedavg", ("ties", {"density": 0.5}), ("ties", {"density": 1.0})],
                        etas=[1.0, 2.0], test_all_etas=test_all_etas)


def _three_clients() -> dict:
    return {100 + i: _rich(i, 10) for i in range(3)}


def test_several_methods_share_one_training_pass_and_one_evaluate_message():
    s = _three_methods()
    assert list(s.settings.methods) == ["fedavg", "ties[density=0.5]", "ties[density=1.0]"]
    assert s.settings.methods["ties[density=0.5]"] == ("ties", {"density": 0.5, "convention": "fl-merge"})  # full parameters
    grid = FakeGrid(_three_clients())
    r = _run(s, grid)
    assert set(r.deltas) == set(s.settings.methods)
    torch.testing.assert_close(r.delta["backbone.w"], r.deltas["fedavg"]["backbone.w"])
    kinds = [m.metadata.message_type for m in grid.asked]
    assert kinds == [MessageType.TRAIN] * 3 + [MessageType.EVALUATE] * 6  # val, then test
    content = grid.asked[3].content
    assert list(content["config"]["delta-methods"]) == list(s.settings.methods)
    assert list(content["config"]["splits"]) == ["val"]  # the eta grid is scored on val only
    assert list(content["config"]["etas"]) == [0.0, 1.0, 2.0] * 3
    for i, label in enumerate(s.settings.methods):
        key = "delta" if i == 0 else f"delta-{i}"
        torch.testing.assert_close(content[key].to_torch_state_dict()["backbone.b"],
                                   r.deltas[label]["backbone.b"])
    assert r.best_etas == {"fedavg": 1.0, "ties[density=0.5]": 2.0, "ties[density=1.0]": 1.0}
    # The second message scores test at the base and each method's chosen eta only.
    cfg = grid.asked[6].content["config"]
    assert list(cfg["splits"]) == ["test"]
    assert list(cfg["etas"]) == [0.0, 1.0, 0.0, 2.0, 0.0, 1.0]
    assert list(cfg["etas-per-delta"]) == [2, 2, 2]
    assert r.metrics["ties[density=0.5]-test-accuracy"] == pytest.approx(0.65)
    assert r.metrics["base-test-accuracy"] == pytest.approx(0.5)
    selected = [row for row in r.rows if row["selected"] and row["split"] == "val"]
    assert len(selected) == 3 * 3 and {row["method_name"] for row in selected} == {"fedavg", "ties"}
    test_rows = [row for row in r.rows if row["split"] == "test" and row["model"] != "finetuned"]
    assert sorted({row["eta"] for row in test_rows if row["method"] == "ties[density=0.5]"}) == [0.0, 2.0]
    assert len([row for row in r.rows if row["split"] == "val" and row["model"] != "finetuned"]) == 3 * 3 * 3


def test_deltas_too_large_for_one_message_are_scored_in_batches(monkeypatch):
    from fl_merge.round import scoring

    order = list(_three_methods().settings.methods)

    class LabelGrid(FakeGrid):  # scores by method label, not by position in the message
        def _answer(self, m):
            if m.metadata.message_type == MessageType.EVALUATE and "delta" in m.content:
                labels = list(m.content["config"]["delta-methods"])
                self.score = lambda i, eta, split: _score(order.index(labels[i]), eta, split)
            return super()._answer(m)

    whole = _run(_three_methods(), LabelGrid(_three_clients()))
    monkeypatch.setattr(scoring, "MESSAGE_DELTA_BYTES", 1)  # one Delta per message
    grid = LabelGrid(_three_clients())
    r = _run(_three_methods(), grid)
    val = [m for m in grid.asked if m.metadata.message_type == MessageType.EVALUATE
           and list(m.content["config"]["splits"]) == ["val"]]
    assert len(val) == 3 * 3  # 3 clients x 3 batches
    assert [list(m.content["config"]["delta-methods"]) for m in val[::3]] == [[m] for m in r.methods]
    assert r.best_etas == whole.best_etas  # the same scores, the same choices
    assert [row["accuracy"] for row in r.rows] == [row["accuracy"] for row in whole.rows]


def test_delta_batches_fit_the_byte_budget():
    from fl_merge.round.scoring import delta_batches

    assert delta_batches(list("abcde"), 40, budget=100) == [["a", "b"], ["c", "d"], ["e"]]
    assert delta_batches(list("abc"), 400, budget=100) == [["a"], ["b"], ["c"]]  # one at least
    assert delta_batches(list("abc"), 1, budget=100) == [["a", "b", "c"]]


def test_test_all_etas_scores_test_in_the_first_message():
    grid = FakeGrid(_three_clients())
    r = _run(_three_methods(test_all_etas=True), grid)
    ev = [m for m in grid.asked if m.metadata.message_type == MessageType.EVALUATE]
    assert len(ev) == 3  # no second message
    assert list(ev[0].content["config"]["splits"]) == ["val", "test"]
    assert r.best_etas["ties[density=0.5]"] == 2.0  # chosen on val, not on test
    assert r.metrics["ties[density=0.5]-test-accuracy"] == pytest.approx(0.65)
    test_rows = [row for row in r.rows if row["split"] == "test" and row["model"] != "finetuned"]
    assert len(test_rows) == 3 * 3 * 3


def test_missing_test_scores_name_the_client():
    honest = FakeGrid({})

    def silent_in_test(m):
        if list(m.content["config"]["splits"]) == ["test"]:
            return RecordDict({"metrics": MetricRecord({"num-examples": 10})})
        return honest._answer(m)

    grid = FakeGrid(_three_clients())
    grid.evaluate = {n: silent_in_test for n in (100, 101, 102)}
    with pytest.raises(MergeRoundError, match=r"no client returned test evaluation scores: "
                                              r"node 100 \(partition 0\): did not score"):
        _run(_three_methods(), grid)


def test_client_failing_evaluation_is_left_out_of_the_results():
    grid = FakeGrid(_three_clients(), evaluate={102: lambda m: Error(code=0, reason="evaluation crashed")})
    r = _run(_three_methods(), grid)
    assert {row["partition_id"] for row in r.rows} == {0, 1}
    assert r.failures[-1]["client"] == "node 102 (partition 2)"
    assert r.failures[-1]["stage"] == "evaluation" and r.failures[-1]["reason"] == "evaluation crashed"
    assert r.missing_tasks == [] and r.unscored_tasks == ["node 102 (partition 2)"]  # merged, not scored
    assert r.metrics["ties[density=0.5]-test-accuracy"] == pytest.approx(0.65)
    # The test phase asks only the clients that scored validation.
    test_msgs = [m for m in grid.asked if m.metadata.message_type == MessageType.EVALUATE][3:]
    assert sorted(m.metadata.dst_node_id for m in test_msgs) == [100, 101]


def test_start_returns_the_merged_model_at_the_chosen_eta():
    s = _three_methods()
    result = s.start(FakeGrid(_three_clients()), ArrayRecord(_theta0()), num_rounds=1, timeout=10.0)
    merged = result.arrays.to_torch_state_dict()
    torch.testing.assert_close(merged["backbone.w"], 1.0 * s.outcome.deltas["fedavg"]["backbone.w"])


def test_merge_keys_matching_nothing_stop_the_run_before_any_message(tmp_path):
    from safetensors.torch import save_file

    from fl_merge.config.run_config import ConfigError, RunConfig
    from fl_merge_strategies.server_app import run_one_shot

    save_file({"enc.w": torch.zeros(2), "cls.w": torch.zeros(3)}, str(tmp_path / "base.safetensors"))
    cfg = RunConfig(num_clients=2, base_checkpoint=str(tmp_path / "base.safetensors"),
                    output_dir=str(tmp_path / "out")).resolve()  # merge-keys: default backbone.*
    grid = FakeGrid({1: _standard(1.0, 10), 2: _standard(2.0, 10)})
    with pytest.raises(ConfigError, match=r"merge-keys \['backbone\.\*'\] match none .*cls\.w, enc\.w"):
        run_one_shot(grid, cfg)
    assert grid.asked == [] and not (tmp_path / "out").exists()  # nothing sent, nothing written


def test_a_serverapp_stopped_by_flower_mid_round_leaves_only_failure_json(tmp_path, monkeypatch):
    """Flower stops a ServerApp with SIGINT, whose handler raises SystemExit inside whatever
    the ServerApp waits on (here the train phase): the output directory gets failure.json
    saying why, and nothing else; the SystemExit goes on, and the parent watch stays armed
    (in case Flower's shutdown hangs)."""
    import json

    from safetensors.torch import save_file

    from fl_merge.config.run_config import RunConfig
    from fl_merge_strategies import server_app
    from fl_merge_strategies.server_app import run_one_shot

    watches = []
    real_watch = server_app.watch_parent
    monkeypatch.setattr(server_app, "watch_parent", lambda f: watches.append(real_watch(f)) or watches[-1])

    class StoppedGrid(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            raise SystemExit(0)

    save_file(_theta0(), str(tmp_path / "base.safetensors"))
    out = tmp_path / "out"
    cfg = RunConfig(num_clients=2, base_checkpoint=str(tmp_path / "base.safetensors"),
                    output_dir=str(out)).resolve()
    try:
        with pytest.raises(SystemExit):
            run_one_shot(StoppedGrid({1: _standard(1.0, 10), 2: _standard(2.0, 10)}), cfg)
        assert len(watches) == 1 and not watches[0].is_set()  # still armed
    finally:
        for w in watches:  # this process is pytest, not a ServerApp: disarm it
            w.set()
    assert sorted(p.name for p in out.iterdir()) == ["failure.json"]
    record = json.loads((out / "failure.json").read_text())
    assert record["status"] == "failed" and record["finished_clients"] == []
    assert record["reason"].startswith("the ServerApp was told to stop while the clients were training")
    assert "clients may have finished without the server knowing" in record["cached_updates"]


def _with_correct(n: int = 20):
    """A grid client that also sends test-correct: per candidate, round(acc * n) examples
    right (the first ones), so each list's mean is that candidate's test accuracy."""
    honest = FakeGrid({})

    def answer(m):
        content = honest._answer(m)
        metrics = dict(content["metrics"])
        if "test-accuracy" in metrics:
            metrics["test-correct"] = [int(i < round(a * n))
                                       for a in metrics["test-accuracy"] for i in range(n)]
        return RecordDict({"metrics": MetricRecord(metrics)})
    return answer


def test_per_example_test_correctness_is_parsed_at_the_choice_with_paired_cis():
    grid = FakeGrid(_three_clients(), evaluate={n: _with_correct() for n in (100, 101, 102)})
    r = _run(_three_methods(), grid)
    # fedavg at eta 1: 0.7 - 0.1 on test = 12 of 20; ties 0.5 at eta 2: 13 of 20; ties 1.0 at eta 1: 6
    assert set(r.predictions) == {"fedavg", "ties[density=0.5]", "ties[density=1.0]", "base"}
    assert r.predictions["fedavg"]["client-0"] == [1] * 12 + [0] * 8
    assert r.predictions["base"]["client-2"] == [1] * 10 + [0] * 10
    for row in r.rows:
        if row["split"] == "test" and row["model"] == "merged" and row["selected"]:
            got = r.predictions[row["method"]][row["task"]]
            assert sum(got) / len(got) == pytest.approx(row["accuracy"])
    by = {c["model"]: c for c in r.comparison}
    assert by["fedavg"]["reference"] == "fedavg"
    assert (by["fedavg"]["diff"], by["fedavg"]["diff_low"], by["fedavg"]["diff_high"]) == (0.0, 0.0, 0.0)
    assert by["ties[density=1.0]"]["diff"] == pytest.approx(0.3 - 0.6)
    assert by["ties[density=1.0]"]["excludes_zero"]
    # +1 example of 20 per task: a resample misses it in all 3 tasks w.p. 0.95^60 = 4.6% > 2.5%
    assert by["ties[density=0.5]"]["diff"] == pytest.approx(0.05)
    assert not by["ties[density=0.5]"]["excludes_zero"]
    assert by["ties[density=0.5]"]["ci_low"] < 0.65 < by["ties[density=0.5]"]["ci_high"]
    assert not any("test-correct" in n for n in r.notes)


def test_per_example_correctness_with_test_all_etas_is_kept_at_the_choice():
    grid = FakeGrid(_three_clients(), evaluate={n: _with_correct() for n in (100, 101, 102)})
    r = _run(_three_methods(test_all_etas=True), grid)
    assert r.best_etas["ties[density=0.5]"] == 2.0
    assert r.predictions["ties[density=0.5]"]["client-1"] == [1] * 13 + [0] * 7  # 0.75 - 0.1 at eta 2
    assert r.predictions["base"]["client-1"] == [1] * 10 + [0] * 10


def test_client_failing_the_test_phase_is_left_out_of_the_cis_too():
    ok = _with_correct()

    def fails_in_test(m):
        if list(m.content["config"]["splits"]) == ["test"]:
            return Error(code=0, reason="test crashed")
        return ok(m)

    grid = FakeGrid(_three_clients(), evaluate={100: ok, 101: ok, 102: fails_in_test})
    r = _run(_three_methods(), grid)
    assert set(r.predictions["fedavg"]) == {"client-0", "client-1"} and r.comparison


def test_without_per_example_correctness_the_cis_are_absent_with_a_note():
    r = _run(_three_methods(), FakeGrid(_three_clients()))
    assert r.predictions == {} and r.comparison == []
    assert any("within-run confidence intervals are absent" in n for n in r.notes)


def test_malformed_test_correct_leaves_the_client_out_named():
    def bad(m):
        content = FakeGrid({})._answer(m)
        metrics = dict(content["metrics"])
        if "test-accuracy" in metrics:
            metrics["test-correct"] = [1, 0, 2]
        return RecordDict({"metrics": MetricRecord(metrics)})

    grid = FakeGrid(_three_clients(), evaluate={102: bad})
    r = _run(_three_methods(), grid)
    assert r.failures[-1]["client"] == "node 102 (partition 2)"
    assert r.failures[-1]["reason"] == ("test-correct must be 6 equal runs of 0/1 values "
                                        "(one per method and eta), got 3 values")


def test_predictions_file_round_trip(tmp_path):
    from safetensors import safe_open

    from fl_merge.io.predictions import load_predictions, save_predictions

    preds = {"ties": {"mnist": [1, 0, 1], "parity": [0, 0]}, "base": {"mnist": [0, 0, 1], "parity": [1, 1]}}
    save_predictions(tmp_path / "p.safetensors", preds, {"ties": 0.3})
    assert load_predictions(tmp_path / "p.safetensors") == preds
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        assert f.get_tensor("ties/mnist").dtype == torch.uint8
        assert '"ties": 0.3' in f.metadata()["etas"]


def test_plain_clients_without_a_query_handler_skip_the_phase_with_a_note():
    """A plain Flower ClientApp has no query function: its error replies leave no coefficient
    gradient, so the phase is skipped (named in notes) and the round finishes."""

    class NoQuery(FakeGrid):
        def _answer(self, m):
            if m.metadata.message_type == MessageType.QUERY:
                return Error(code=0, reason="no query function registered")
            return super()._answer(m)

    s = OneShotMerge(method="task_arithmetic", etas=[1.0], learn_coefficients="task", coef_rounds=2)
    r = _run(s, NoQuery({1: _standard(1.0, 10), 2: _standard(2.0, 10)}))
    assert any(n.startswith("learned coefficients skipped: coefficient round 0: no client answered")
               for n in r.notes), r.notes
    assert list(r.best_etas) == ["task_arithmetic"] and r.coefficients == {}


def test_a_lost_client_is_named_once_with_its_partition_and_task():
    """Partitions 0 and 2 reply, the node running partition 1 is lost (an error reply whose
    reason is Flower's): one record, its node id, partition 1 by elimination, its task, the
    true reason; the missing task is listed. With two lost nodes nothing is guessed."""
    tasks = ["rotate90", "parity", "invert"]
    lost = Error(code=0, reason="node lost: missed heartbeats")
    r = _run(OneShotMerge(method="fedavg", task_names=tasks, etas=[1.0]),
             FakeGrid({100: _rich(0, 10), 101: lost, 102: _rich(2, 10)}))
    assert r.failures == [{"client": "node 101 (partition 1)", "node_id": 101, "partition_id": 1,
                           "stage": "train", "reason": "node lost: missed heartbeats", "task": "parity"}]
    assert r.missing_tasks == ["parity"]
    r = _run(OneShotMerge(method="fedavg", task_names=tasks, etas=[1.0]),
             FakeGrid({100: _rich(0, 10), 101: lost, 103: None}))
    assert [(f["node_id"], f["partition_id"], f["task"]) for f in r.failures] == [(101, None, None),
                                                                                 (103, None, None)]
    assert "no reply" in r.failures[1]["reason"]
    assert r.missing_tasks == ["parity", "invert"]


def test_a_round_that_stops_writes_failure_json_with_who_finished(tmp_path):
    """min-clients=3 and one of 3 lost: the MergeRoundError carries the round so far, and the
    ServerApp's failure.json says why, who finished (partition, task, node), who was lost."""
    import json

    from fl_merge.round.failures import FAILURE_FILE
    from fl_merge_strategies.server_app import write_failure

    tasks = ["rotate90", "parity", "invert"]
    with pytest.raises(MergeRoundError, match=r"only 2 usable .*need at least 3") as err:
        _run(OneShotMerge(method="fedavg", task_names=tasks, min_clients=3),
             FakeGrid({100: _rich(0, 10), 101: Error(code=0, reason="killed"), 102: _rich(2, 10)}))
    write_failure(tmp_path, str(err.value), err.value.partial)
    record = json.loads((tmp_path / FAILURE_FILE).read_text())
    assert record["status"] == "failed" and "need at least 3" in record["reason"]
    assert [(c["partition_id"], c["task"], c["node_id"]) for c in record["finished_clients"]] == [
        (0, "rotate90", 100), (2, "invert", 102)]
    assert [(f["node_id"], f["task"], f["reason"]) for f in record["lost_clients"]] == [
        (101, "parity", "killed")]
    assert record["missing_tasks"] == ["parity"] and record["stage"] == "train"
    assert "cache=true reuses them" in record["cached_updates"]


def test_no_reply_says_whether_the_timeout_ran_out_or_flower_gave_up_earlier():
    from fl_merge.round.failures import no_reply_reason

    assert no_reply_reason(120.0, 120.0) == "no reply within the round timeout (120s)"
    assert no_reply_reason(71.2, 120.0) == ("no reply: Flower stopped waiting for the node after 71s, "
                                            "before the round timeout (120s); the node was lost")


def test_message_bytes_count_empty_config_values_as_nothing():
    """Flower's ConfigRecord.count_bytes refuses "" and []: they count as 0 bytes here."""
    from flwr.app import ConfigRecord

    from fl_merge_strategies.one_shot import _bytes

    content = RecordDict({"config": ConfigRecord({"plugins": "", "coef": [1.0, 2.0], "none": [], "m": "ab"})})
    assert _bytes(content) == (2 * 8 + len("coef")) + (2 + len("m"))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "fisher", "median", "regmean"])
def test_spilled_round_equals_the_in_memory_round_and_an_independent_merge(tmp_path, method):
    """spill_dir: each train reply pulled on its own and written to disk as it arrives, task
    vectors too (fl_merge/io/spill.py); the Deltas, heads and choices are those of the
    in-memory round, the Delta that of merge() on task vectors computed here, and no spill
    file is left behind."""
    from fl_merge import merge
    from fl_merge.core.task_vectors import split_extras, task_vector

    steps = [10, 20, 40]
    replies = {100 + i: _rich(i, s) for i, s in reversed(list(enumerate(steps)))}
    kwargs = {"method": method, "weighting": "num-examples", "etas": [1.0, 2.0]}
    plain = _run(OneShotMerge(**kwargs), FakeGrid(replies))
    grid = FakeGrid(replies)
    spilled = _run(OneShotMerge(**kwargs, spill_dir=str(tmp_path)), grid)
    assert all(len(ids) == 1 for ids in grid.pulls)  # one reply in memory at a time
    states = [split_extras(replies[100 + i]["arrays"].to_torch_state_dict()) for i in range(3)]
    taus = [task_vector(w, _theta0(), list(_theta0())) for w, _ in states]
    expected = merge(method, taus, weights=[10.0, 20.0, 30.0], local_steps=steps,
                     names=[f"partition {i}" for i in range(3)],
                     extras={n: [e[n] for _, e in states] for n in get_method(method).needs.extras} or None)
    for k in _theta0():
        torch.testing.assert_close(spilled.delta[k], expected[k], rtol=0, atol=0)
        torch.testing.assert_close(spilled.delta[k], plain.delta[k], rtol=0, atol=0)
    assert spilled.best_etas == plain.best_etas and spilled.rows == plain.rows
    for c, (w, _) in zip(spilled.clients, states):
        torch.testing.assert_close(c.per_task["head.weight"], w["head.weight"], rtol=0, atol=0)
    # the round's updates and task vectors went with the round; theta0 and the Deltas stay
    # on disk for the results until the round is closed
    assert [p.name.startswith(".spill-") for p in tmp_path.iterdir()] == [True]
    spilled.close()
    assert list(tmp_path.iterdir()) == []


def test_spilled_round_names_failed_and_malformed_clients_and_cleans_up(tmp_path):
    bad = _standard(1.0, 10)
    bad["arrays"]["backbone.w"] = ArrayRecord({"x": torch.full((3, 2), float("nan"))})["x"]
    r = _run(OneShotMerge(method="fedavg", etas=[1.0], spill_dir=str(tmp_path)),
             FakeGrid({11: _standard(1.0, 10), 12: bad, 13: Error(code=0, reason="out of memory"),
                       14: _standard(3.0, 10)}))
    torch.testing.assert_close(r.delta["backbone.w"], torch.full((3, 2), 2.0))
    reasons = {f["node_id"]: f["reason"] for f in r.failures}
    assert reasons == {12: "non-finite update in backbone.w", 13: "out of memory"}
    r.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MergeRoundError, match="only 0 usable client update"):
        _run(OneShotMerge(method="fedavg", etas=[1.0], spill_dir=str(tmp_path)),
             FakeGrid({11: Error(code=0, reason="boom"), 12: Error(code=0, reason="boom")}))
    assert list(tmp_path.iterdir()) == []  # also when the round fails


def test_too_few_clients_connected_leaves_failure_json(tmp_path):
    """A ServerApp whose clients never all connect (a bare `flwr run` with Flower's default 2
    simulated SuperNodes for 3 clients) fails with one line and leaves failure.json saying
    so, as every failed run does; it used to leave only run.log."""
    import json

    from safetensors.torch import save_file

    from fl_merge.config.run_config import ConfigError, RunConfig
    from fl_merge_strategies.server_app import run_one_shot

    save_file(_theta0(), str(tmp_path / "base.safetensors"))
    out = tmp_path / "out"
    cfg = RunConfig(num_clients=2, base_checkpoint=str(tmp_path / "base.safetensors"), output_dir=str(out),
                    connect_timeout=0.2).resolve()
    with pytest.raises(ConfigError, match="only 1 of num-clients=2 clients connected after 0s"):
        run_one_shot(FakeGrid({1: _standard(1.0, 10)}), cfg)
    record = json.loads((out / "failure.json").read_text())
    assert record["status"] == "failed" and "only 1 of num-clients=2 clients connected" in record["reason"]
