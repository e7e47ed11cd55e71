"""A checkpoint client's local work: its fine-tuned weights come from a file, not training.

The reply is a training client's (fl_merge/io/client_checkpoints.py decides what is read):
full weights (the checkpoint's backbone, and its head or a probe head fitted on frozen
theta0 features, as a training client's), num-examples, the fine-tuned model's own
validation and test scores, local steps where known, the same optional extras (gradient
at theta0, diagonal Fisher and Gram matrices at the fine-tuned weights, computed on the
client's own training split).

Memory: one model. theta0 is read tensor by tensor (memory-mapped with chunked messages), the
checkpoint's tensors are copied into the model one at a time, and the reply holds the
model's own tensors: theta0 + checkpoint + model would be three copies.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from fl_merge.tasks.registry import TaskData
from .training import mean_gradient, model_for_task, trained_statistics
from fl_merge.io.checkpoints import Checkpoint
from fl_merge.io.client_checkpoints import (
    CHECKPOINT_METRIC,
    CheckpointClientError,
    head_keys,
    open_client_checkpoint,
    steps_for,
)
from fl_merge.models.assign import assign_tensor_
from fl_merge.models.device import client_device
from fl_merge.models.evaluation import evaluate
from fl_merge.models.registry import MERGED_PREFIX
from fl_merge.round.keys import DEFAULT_MERGE_KEYS, key_matcher
from fl_merge.core.task_vectors import EXTRA_PREFIX


def checkpoint_update(config: Mapping[str, Any], pid: int, theta0: Mapping[str, torch.Tensor],
                      path: str, task: TaskData, seed: int,
                      node_config: Mapping[str, Any] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full weights + "extra.<name>." arrays, metrics) of the client whose fine-tuned model
    is the checkpoint at `path`; CheckpointClientError when it does not fit theta0."""
    t0 = time.perf_counter()
    role = f"partition {pid} ({task.name}) checkpoint {path}"
    is_merged = key_matcher([str(p) for p in config.get("merge-keys", DEFAULT_MERGE_KEYS)])
    ck, mapping = open_client_checkpoint(path, theta0, is_merged, role)
    with ck:
        head = {k: ck.get(src).float() for k, src in head_keys(ck.keys, task.name).items()}
        meta = dict(ck.metadata)
        device = client_device(config.get("device"))
        model = model_for_task(str(config["model"]), task, theta0, seed, device)  # probe head on theta0
        if head:
            want = tuple(model.head.weight.shape)
            if tuple(head["head.weight"].shape) != want or set(head) != {"head.weight", "head.bias"}:
                raise CheckpointClientError(
                    f"{role}: its head has {list(head['head.weight'].shape)} weights but task "
                    f"'{task.name}' needs [{want[0]}, {want[1]}] and a bias; save the head of this "
                    "task or none (a probe head is then fitted)")
            model.head.load_state_dict({k[len("head."):]: v for k, v in head.items()})
        extras: dict[str, dict] = {}
        if bool(config.get("compute-grad0", False)):  # at theta0, as a training client sends it
            extras["grad0"] = mean_gradient(model, task.train, int(config.get("grad0-samples", 1024)))
        _load_backbone(model, ck, mapping, theta0)
    val_acc, _ = evaluate(model, task.val)
    test_acc, test_loss = evaluate(model, task.test)
    steps_list = config.get("checkpoint-steps", [])
    metrics: dict[str, Any] = {
        **steps_for(node_config or {}, list(steps_list) if isinstance(steps_list, list) else [],
                    pid, meta),
        "finetuned-accuracy": test_acc, "finetuned-val-accuracy": val_acc,
        "finetuned-loss": test_loss, "num-examples": len(task.train), "seed": seed,
        "partition-id": pid, CHECKPOINT_METRIC: 1, "cached": 0,
        "train-seconds": time.perf_counter() - t0,  # reading and scoring: no training
    }
    out = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # the model's own tensors
    extras.update(trained_statistics(model, task.train, config, seed))  # at the checkpoint's weights
    for name, arrays in extras.items():
        out.update({f"{EXTRA_PREFIX}{name}.{k}": v.detach().cpu() for k, v in arrays.items()})
    return out, metrics


def _load_backbone(model: torch.nn.Module, ck: Checkpoint, mapping: Mapping[str, str],
                   theta0: Mapping[str, torch.Tensor]) -> None:
    """The checkpoint's backbone tensors into `model` (which holds theta0), one at a time,
    each in theta0's dtype: the backbone of read_client_checkpoint's state (the checkpoint's
    tensor where it has one, theta0's elsewhere) without that whole second model in memory."""
    targets = model.backbone.state_dict()  # views of the model's own storage
    for k, src in mapping.items():
        if k.startswith(MERGED_PREFIX):
            assign_tensor_(targets[k[len(MERGED_PREFIX):]], ck.get(src).to(theta0[k].dtype))
