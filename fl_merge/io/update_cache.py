"""Content-addressed cache of client updates: a client whose update is cached skips training.

The key hashes everything that determines the update: the received weights theta0 (their
bytes), the client's task/partition and data seed, its training values, what extras it
must send, the model name, TRAINER_VERSION (bump it when local training changes what it
produces) and the CPU kernels in effect (fl_merge/core/kernels.py). An entry is one safetensors file written atomically, holding the update's
tensors plus, in its metadata, the metrics and a SHA-256 of every tensor's bytes: an entry
that fails to load or to verify is deleted and rebuilt, never used.

Writes go through the one safetensors writer, `fl_merge.core.safetensors_writer` (hidden
temporary file in the same directory, fsync, rename): a client killed mid-write leaves no
entry under the key's name, only a hidden temporary file that is never read and is removed
by the next write. Entries
written before the kill are whole, so a rerun resumes from them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fl_merge.core.kernels import cache_key_part
from fl_merge.models.registry import cache_root
from fl_merge.core.safetensors_writer import save_tensors

TRAINER_VERSION = 1


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over sorted keys, dtypes, shapes and bytes of a state dict."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().contiguous().cpu()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def update_key(theta0_digest: str, spec: Mapping[str, Any]) -> str:
    # the CPU kernels decide the update's bits too (fl_merge/core/kernels.py)
    payload = json.dumps({"theta0": theta0_digest, "trainer": TRAINER_VERSION, **spec, **cache_key_part()},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def entry_path(key: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "updates" / f"{key}.safetensors"


def load_update(key: str, root: Path | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(state, metrics) of a valid entry, else None (a corrupt entry is removed)."""
    path = entry_path(key, root)
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        metrics = json.loads(meta["metrics"])
        if meta.get("checksum") != state_digest(state):
            raise ValueError("checksum mismatch")
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError):
        path.unlink(missing_ok=True)
        return None
    return state, metrics


def save_update(key: str, state: Mapping[str, torch.Tensor], metrics: Mapping[str, Any],
                root: Path | None = None) -> Path:
    path = entry_path(key, root)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"metrics": json.dumps(dict(metrics)), "checksum": state_digest(tensors)}
    return save_tensors(path, tensors, meta)
