"""The client's part of the learned-coefficient phase (fl_merge/round/coefficients.py):
keep theta0 and the K task vectors from the phase's first message in the node state, then
per message build theta(lambda), return the coefficient gradient on the even half of the
validation split and the accuracy on the odd half. Test data is never read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict
from torch.utils.data import TensorDataset

from fl_merge.tasks.registry import TaskData
from fl_merge.merging.learned import (
    coefficient_gradient,
    combine,
    parameter_gradient,
    split_validation,
)
from fl_merge.models.evaluation import evaluate
from fl_merge.round import coefficients as proto

_META = "coef-meta"


def keep_vectors(content: RecordDict, state: RecordDict) -> None:
    """Store the first message's theta0 (with this client's per-task parameters), task
    vectors and blocks in the node state, replacing any earlier phase's."""
    records = content.array_records
    if proto.BASE not in records:
        return
    for key in [k for k in state.array_records if k.startswith(proto.VECTOR_PREFIX)]:
        del state[key]
    state[proto.BASE] = records[proto.BASE]
    for key, rec in records.items():
        if key.startswith(proto.VECTOR_PREFIX):
            state[key] = rec
    state[_META] = ConfigRecord({proto.BLOCKS: list(content["config"][proto.BLOCKS])})


def answer(content: RecordDict, state: RecordDict, task: TaskData,
           build: Callable[[Mapping[str, torch.Tensor]], torch.nn.Module]) -> dict[str, Any]:
    """The reply metrics to one coefficient message (`build(state_dict)` makes the model)."""
    keep_vectors(content, state)
    fit, stop = split_validation(len(task.val))
    if proto.BASE not in state.array_records:
        return {proto.MISSING: 1, "num-examples": len(fit)}
    theta0 = state[proto.BASE].to_torch_state_dict()
    k = sum(1 for key in state.array_records if key.startswith(proto.VECTOR_PREFIX))
    tvs = [state[f"{proto.VECTOR_PREFIX}{i}"].to_torch_state_dict() for i in range(k)]
    blocks = [tuple(b.split("|")) for b in state[_META][proto.BLOCKS]]
    coefs, objective = proto.parse_request(content["config"])
    model = build(combine(theta0, tvs, coefs, blocks))
    x, y = task.val.tensors
    merged = [key for b in blocks for key in b]
    grads = parameter_gradient(model, x[fit], y[fit] if objective == "supervised" else None,
                               objective, merged)
    g = coefficient_gradient(grads, tvs, blocks)
    acc, _ = evaluate(model, TensorDataset(x[stop], y[stop]))
    return {proto.GRAD: [float(v) for v in g.reshape(-1)], proto.SCORE: acc, "num-examples": len(fit)}
