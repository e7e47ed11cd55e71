"""Tasks merged but never scored: a client lost after its update arrived (network cut during
evaluation) leaves its task out of the test results; run.json says which (unscored_tasks),
apart from the tasks never merged (missing_tasks)."""

from __future__ import annotations

from fl_merge.round.failures import attribute, unscored_tasks

TASKS = ["rotate90", "invert", "patch-shuffle", "digits8x8"]


def _lost(node: int, stage: str, partition: int | None) -> dict:
    label = f"node {node}" if partition is None else f"client-{partition}"
    return {"client": label, "node_id": node, "partition_id": partition, "stage": stage, "reason": "gone"}


def test_only_clients_lost_after_training_leave_their_task_unscored():
    # node 7: lost in training (partition unknown); node 3: lost at validation; node 5 at test;
    # node 3 also failed test later (named once, at its first failure)
    failures = [_lost(7, "train", None), _lost(5, "test evaluation", 2), _lost(3, "evaluation", 1),
                _lost(3, "test evaluation", 1)]
    named, missing = attribute(failures, usable=[1, 2, 3], num_clients=4, task_names=TASKS)
    assert missing == ["rotate90"]  # never merged
    assert [f["node_id"] for f in named] == [3, 5, 7]
    assert unscored_tasks(named) == ["invert", "patch-shuffle"]  # merged, not scored, by node id


def test_a_client_without_task_names_is_listed_by_its_label_and_train_losses_are_not():
    named, _ = attribute([_lost(4, "evaluation", 0), _lost(9, "train", None)], usable=[0], num_clients=2,
                         task_names=None)
    assert unscored_tasks(named) == ["client-0"]
    assert unscored_tasks([]) == []
