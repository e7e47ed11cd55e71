"""theta0 from a checkpoint path (run-config `base-checkpoint`) instead of the model registry.

The base is read by the one checkpoint reader, `fl_merge.io.checkpoints.Checkpoint` with
``pickles=True``, exactly as the fine-tuned (client) checkpoints are: a safetensors file, a
sharded folder with its ``*.safetensors.index.json`` (or that index file), a Hugging Face
model folder (``model.safetensors``, sharded, or ``pytorch_model.bin``) or a torch state dict
(.pt/.pth/.bin/.ckpt). Its tensors are theta0 under their own names; `merge-keys` says which
of them are merged.

Or theta0 from code, as a Flower app's ServerApp usually builds its initial model:
``python:<module>:<function>``, a function without arguments returning a state dict of
tensors or a torch module (docs/own_app.md); the module must be importable (an app's
directory is on the path of every process Flower starts for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.io.checkpoints import Checkpoint, pickle_file
from fl_merge.io.mapped_base import mapped_checkpoint

ROLE = "base-checkpoint"
PYTHON_PREFIX = "python:"


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


def _from_code(ref: str) -> dict[str, torch.Tensor]:
    """theta0 from ``python:<module>:<function>``: the function's state dict, on the CPU."""
    import importlib

    module, _, name = ref.removeprefix(PYTHON_PREFIX).partition(":")
    form = f"{ROLE} {ref}: "
    if not module or not name:
        raise CheckpointError(form + "write python:<module>:<function>, e.g. python:my_app.task:base_weights")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(form + f"cannot import it ({type(e).__name__}: {e}); is its folder "
                              f"on PYTHONPATH (the app directory)?") from None
    state = fn()
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(form + "must return a torch module or a non-empty dict of name -> tensor, "
                              f"got {type(state).__name__}")
    return {k: v.detach().cpu() for k, v in state.items()}


def check_base_checkpoint(path: str | Path) -> None:
    """Before any training: `path` is a checkpoint the reader opens, with tensors
    (CheckpointError saying what would be right otherwise). Safetensors are checked by their
    headers only; a torch pickle, which cannot be read in part, only for being there; a
    ``python:`` function by calling it."""
    if str(path).startswith(PYTHON_PREFIX):
        _from_code(str(path))
    elif pickle_file(Path(str(path)).expanduser()) is None:
        _open(path).close()


def load_checkpoint(path: str | Path, mapped: bool = False) -> Mapping[str, torch.Tensor]:
    """theta0 from `path`: every tensor of the checkpoint, on the CPU, in its order. With
    `mapped` (a large-model round) a safetensors checkpoint's tensors stay in its files,
    memory-mapped one at a time when read (`fl_merge.io.mapped_base.mapped_checkpoint`),
    never read whole; a torch pickle or a ``python:`` base is read whole as without."""
    if str(path).startswith(PYTHON_PREFIX):
        return _from_code(str(path))
    with _open(path) as ck:
        if mapped and (state := mapped_checkpoint(ck)) is not None:
            return state
        return {k: ck.get(k) for k in ck.keys}
