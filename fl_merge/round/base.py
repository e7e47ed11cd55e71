"""theta0 from a checkpoint path (run-config `base-checkpoint`) instead of the model registry.

A path is a safetensors file, or a Hugging Face style directory holding ``model.safetensors``.
Its tensors are theta0 under their own names; `merge-keys` says which of them are merged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CHECKPOINT_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A base checkpoint path that cannot be read (one line)."""


def checkpoint_file(path: str | Path) -> Path:
    """The safetensors file a `base-checkpoint` value names; CheckpointError saying what
    would be right otherwise."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        f = p / CHECKPOINT_FILE
        if not f.is_file():
            raise CheckpointError(f"base-checkpoint directory {p} has no {CHECKPOINT_FILE}: give a "
                                  f".safetensors file or a directory holding {CHECKPOINT_FILE}")
        return f.resolve()
    if not p.is_file():
        raise CheckpointError(f"base-checkpoint {p} does not exist: give a .safetensors file or a "
                              f"directory holding {CHECKPOINT_FILE}")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"base-checkpoint {p} is not a .safetensors file")
    return p.resolve()


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """theta0 from `path` (see checkpoint_file): every tensor of the file, on the CPU."""
    f = checkpoint_file(path)
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"base-checkpoint {f} is not a readable safetensors file: {e}") from None
    if not state:
        raise CheckpointError(f"base-checkpoint {f} holds no tensors")
    return state
