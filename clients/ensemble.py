"""The client's part of the prediction-ensemble phase (fl_merge/round/ensemble.py): build the
K members theta0 + tau_i from the message, average their softmax on this client's
validation and test examples (fl_merge.merging.ensemble), and reply the ensemble's scores and each
member's validation accuracy and per-example test correctness. Only scores travel back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import RecordDict

from fl_merge.tasks.registry import TaskData
from fl_merge.merging.ensemble import mean_probabilities, member_logits, probability_scores
from fl_merge.round import ensemble as proto
from fl_merge.round.protocol import ACCURACY, CORRECT, LOSS
from fl_merge.core.task_vectors import apply_update


def answer(content: RecordDict, task: TaskData,
           build: Callable[[Mapping[str, torch.Tensor]], torch.nn.Module]) -> dict[str, Any]:
    """The reply metrics to one ensemble message (`build(state_dict)` makes the model)."""
    k = int(content["config"][proto.MEMBERS])
    records = content.array_records
    missing = [f"{proto.MEMBER_PREFIX}{i}" for i in range(k) if f"{proto.MEMBER_PREFIX}{i}" not in records]
    if missing or "arrays" not in records:
        raise ValueError(f"ensemble message lacks {missing or ['arrays']} ({k} members announced)")
    base = records["arrays"].to_torch_state_dict()
    data = {"val": task.val, "test": task.test}
    logits: dict[str, list[torch.Tensor]] = {"val": [], "test": []}
    for i in range(k):
        tau = records[f"{proto.MEMBER_PREFIX}{i}"].to_torch_state_dict()
        model = build(apply_update(base, tau, 1.0))
        for split, ds in data.items():
            logits[split].append(member_logits(model, ds))
    metrics: dict[str, Any] = {}
    for split, ds in data.items():
        y = ds.tensors[1]
        acc, loss, right = probability_scores(mean_probabilities(logits[split]), y)
        metrics[f"{split}-{ACCURACY}"], metrics[f"{split}-{LOSS}"] = acc, loss
        if split == "test":
            metrics[f"test-{CORRECT}"] = right
    yv, yt = task.val.tensors[1], task.test.tensors[1]
    metrics[proto.MEMBER_ACCURACY] = [float((z.argmax(1) == yv).float().mean()) for z in logits["val"]]
    metrics[proto.MEMBER_CORRECT] = [int(v) for z in logits["test"] for v in (z.argmax(1) == yt).int().tolist()]
    return metrics
