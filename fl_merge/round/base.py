"""theta0 from a checkpoint path (run-config `base-checkpoint`) instead of the model registry.

The base is read by the one checkpoint reader, `fl_merge.io.checkpoints.Checkpoint` with
``pickles=True``, exactly as the fine-tuned (client) checkpoints are: a safetensors file, a
sharded folder with its ``*.safetensors.index.json`` (or that index file), a Hugging Face
model folder (``model.safetensors``, sharded, or ``pytorch_model.bin``) or a torch state dict
(.pt/.pth/.bin/.ckpt). Its tensors are theta0 under their own names; `merge-keys` says which
of them are merged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.io.checkpoints import Checkpoint, pickle_file

ROLE = "base-checkpoint"


class CheckpointError(ValueError):
    """A base checkpoint path that cannot be read (one line)."""


def _open(path: str | Path) -> Checkpoint:
    try:
        ck = Checkpoint(Path(str(path)).expanduser(), ROLE, pickles=True)
    except MergeInputError as e:
        raise CheckpointError(str(e)) from None
    if not ck.keys:
        ck.close()
        raise CheckpointError(f"{ROLE} {path} holds no tensors")
    return ck


def check_base_checkpoint(path: str | Path) -> None:
    """Before any training: `path` is a checkpoint the reader opens, with tensors
    (CheckpointError saying what would be right otherwise). Safetensors are checked by their
    headers only; a torch pickle, which cannot be read in part, only for being there."""
    if pickle_file(Path(str(path)).expanduser()) is None:
        _open(path).close()


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """theta0 from `path`: every tensor of the checkpoint, on the CPU, in its order."""
    with _open(path) as ck:
        return {k: ck.get(k) for k in ck.keys}
