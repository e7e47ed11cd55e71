"""Small pieces several merge methods share: a weighted sum over the client rows of a
block, the working dtype of a list of task vectors, and the iteration-count check of the
fixed-point methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.merging.method import is_integer
from fl_merge.merging.streaming import work_dtype

# More iterations than any fixed-point method here needs (each is O(K^2) work; a typo like
# iters=1e9 would otherwise hang the merge).
MAX_ITERS = 10_000


def expand_weights(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """weights [K] shaped to broadcast against stacked [K, ...]."""
    return weights.reshape(-1, *([1] * (stacked.dim() - 1)))


def weighted_sum(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """sum_i w_i stacked[i] as one matrix-vector product (reads each value once)."""
    return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)


def task_vectors_dtype(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> torch.dtype:
    """The working dtype (float32 at least) of the task vectors' first tensor."""
    return work_dtype(next(iter(task_vectors[0].values())).dtype)


def check_iters(params: dict) -> None:
    it = params["iters"]
    if not is_integer(it) or not 1 <= it <= MAX_ITERS:
        raise MergeInputError(f"iters must be an integer >= 1 (at most {MAX_ITERS}), got {it!r}")
