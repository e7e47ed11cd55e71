"""A client names its own task in its train reply (ConfigRecord `task-name`, docs/protocol.md):
the name is read, checked, used to order and label the clients, and two clients with one
name stop the round in one line."""

from __future__ import annotations

import pytest
import torch

from fl_merge.round.keys import key_matcher
from fl_merge.round.outcome import MergeRound
from fl_merge.round.updates import ClientUpdate, MergeRoundError, collect_updates, reported_task_name


def _client(node: int, task: str | None, value: float, pid: int | None = None) -> ClientUpdate:
    metrics = {"num-examples": 1, **({} if pid is None else {"partition-id": pid})}
    return ClientUpdate(node, metrics, {"enc.w": torch.full((2,), value)}, task=task)


def test_the_reply_name_is_read_from_any_config_record_and_checked():
    assert reported_task_name({}, 3) is None
    assert reported_task_name({"config": {"other": 1}}, 3) is None
    assert reported_task_name({"meta": {"task-name": "lo"}}, 3) == "lo"
    assert reported_task_name({"a": {"task-name": "lo"}, "b": {"task-name": "lo"}}, 3) == "lo"
    with pytest.raises(MergeRoundError, match=r"^node 3 replied two task names, 'hi', 'lo'; reply one$"):
        reported_task_name({"a": {"task-name": "lo"}, "b": {"task-name": "hi"}}, 3)
    for bad in ("", " lo", "lo\nhi", 7):
        with pytest.raises(MergeRoundError, match=r"^node 3 replied task-name=.*non-empty string on one line"):
            reported_task_name({"c": {"task-name": bad}}, 3)


def test_reply_names_order_label_and_name_the_clients():
    theta0 = {"enc.w": torch.zeros(2)}
    # node ids are random in Flower: without partition ids the names decide the order
    ups = [_client(50, "mid", 2.0), _client(10, "lo", 1.0), _client(30, None, 3.0), _client(90, "a", 0.5, pid=0)]
    clients, taus, failures = collect_updates(ups, theta0, key_matcher(["enc.*"]))
    assert failures == []
    assert [c.node_id for c in clients] == [90, 30, 10, 50]  # partition first, then unnamed, names
    assert [float(t["enc.w"][0]) for t in taus] == [0.5, 3.0, 1.0, 2.0]
    r = MergeRound(methods={}, etas=[1.0], task_names=["from-config"])
    # a reply name wins over tasks= (it is the client's own); tasks= names the rest
    assert [r.task_name(c) for c in clients] == ["a", "node-30", "lo", "mid"]
    assert clients[0].label == "node 90 (partition 0, task a)" and clients[2].label == "node 10 (task lo)"
    assert clients[2].identity == "task lo" and clients[1].identity == "node 30"


def test_two_clients_with_one_name_stop_the_round_naming_both():
    theta0 = {"enc.w": torch.zeros(2)}
    with pytest.raises(MergeRoundError, match=r"^node 10 \(task lo\) and node 20 \(task lo\) both replied "
                                              r"task-name='lo'; each client's task needs its own name$"):
        collect_updates([_client(20, "lo", 1.0), _client(10, "lo", 2.0)], theta0, key_matcher(["enc.*"]))
