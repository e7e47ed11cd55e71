"""Whole-update methods on checkpoint files through their declared passes (`fl-merge merge`).

A method that declares a global pass (fl_merge/merging/passes.py: TIES at its default
convention, Krum, Multi-Krum, CClip, the geometric median, PCB, DARE-TIES, hetero) reads the
whole update only through a few numbers (thresholds and a tie sign, a selection,
coefficients, clip bounds and score cuts, a Gram matrix). `file_pass`
runs that pass once over lazy task vectors read from the files (`FileTaskVector`: model
i's tau_i[key] = theta_i[key] - theta0[key], read when asked, one tensor at a time, in the
work dtype with the arithmetic of file_merge.merge_tensor); the file merge then merges
tensor by tensor with ``merge(..., stats=...)``, which is exactly the whole-update merge
restricted to that tensor. Memory: what the pass streams holds about one tensor per model
(streaming.iter_blocks stacks the K models' tensor of one name) plus the pass's small
state (TIES: K x 2^15 histogram counts); never a whole task vector.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from fl_merge.io.checkpoints import Checkpoint
from fl_merge.io.spill import release_freed_memory
from fl_merge.merging.passes import global_statistics, has_global_pass
from fl_merge.merging.streaming import work_dtype

__all__ = ["FileTaskVector", "file_pass", "task_vector_of"]


def task_vector_of(theta: torch.Tensor, base: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """theta - theta0 in `work` (float32; float64 for a float64 base), given `base` =
    theta0 already in `work`: the one subtraction of the file merge (merge_tensor and the
    passes' task vectors alike, so both see the same bits)."""
    return theta.to(work).sub_(base) if theta.dtype != work else theta.sub(base)


class _BaseCache:
    """The base's last tensor in its work dtype, shared by the K task vectors: a pass reads
    the K models' tensor of one name in a row, and the base's is then read once, not K
    times. At each new name the freed heap goes back to the system (`malloc_trim`): the
    tensors read from the files are heap blocks, and the small ones a pass keeps between
    them (TIES's radix-select candidates) pin their pages otherwise (measured: a TIES pass
    over 3 fp16 models of 256 MB grew to 3.5 GB resident without it, 0.3 GB with it)."""

    def __init__(self, base: Checkpoint) -> None:
        self.base, self.key, self.value = base, None, None

    def get(self, key: str) -> torch.Tensor:
        if key != self.key:
            self.value = None  # the previous one goes before the next is read
            release_freed_memory()
            theta0 = self.base.get(key)
            self.value, self.key = theta0.to(work_dtype(theta0.dtype)), key
        return self.value


class FileTaskVector(Mapping):
    """One model's task vector over `keys`, read-only and lazy: ``tv[key]`` reads theta_i's
    and theta0's tensor `key` from the files and returns a new tensor theta_i - theta0 in
    the work dtype; nothing is kept but the base's last tensor (shared by the models)."""

    def __init__(self, model: Checkpoint, base: _BaseCache, keys: Sequence[str]) -> None:
        self.model, self._base, self._keys = model, base, list(keys)
        self._known = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        base = self._base.get(key)
        return task_vector_of(self.model.get(key), base, base.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._known


def file_task_vectors(base: Checkpoint, models: Sequence[Checkpoint], keys: Sequence[str]
                      ) -> list[FileTaskVector]:
    """The models' lazy task vectors over `keys` (the float tensors the file merge merges)."""
    cache = _BaseCache(base)
    return [FileTaskVector(m, cache, keys) for m in models]


def file_pass(method: str, params: Mapping[str, Any], base: Checkpoint, models: Sequence[Checkpoint],
              keys: Sequence[str], weights: Sequence[float] | None = None,
              names: Sequence[str] | None = None) -> Any | None:
    """The statistics of `method`'s declared pass over the models' whole task vectors (the
    tensors `keys`), streamed from the files, for ``merge(..., stats=...)`` tensor by
    tensor; None when the method has no pass to run (per tensor is the method already, or
    it declares none: a per-tensor variant) or there is nothing to merge. Validates as
    fl_merge.merge does (a non-finite input stops naming the model and tensor)."""
    if not keys or not has_global_pass(method, dict(params)):
        return None
    return global_statistics(method, file_task_vectors(base, models, keys), weights,
                             names=names, device="cpu", **params)
