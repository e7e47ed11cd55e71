"""What the per-matrix (SVD) merges share: tsv_m, iso_c and iso_cts merge every 2-D weight
matrix on its own by a function of its singular vectors and take the weighted mean of every
other tensor (biases, norms, convolutions, scalars), as their authors' code does.

`merge_per_matrix` is that loop over the tensors (working dtype, `device`, result on CPU in
the inputs' dtype); `numerical_rank_mask`, `polar` and `partial_isometry` are the linear
algebra they share."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fl_merge.core.task_vectors import StateDict
from fl_merge.merging.streaming import work_dtype


def is_matrix(t: torch.Tensor) -> bool:
    """The tensors merged by SVD: 2-D with no empty side."""
    return t.ndim == 2 and t.numel() > 0


def live_clients(weights: torch.Tensor) -> list[int]:
    """The clients with a positive weight p_i (a client of weight 0 adds nothing to a mean)."""
    return [i for i, w in enumerate(weights.tolist()) if w > 0]


def weighted_mean(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
                  key: str, live: Sequence[int], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """sum_i p_i tau_i[key] over the live clients, on `device` in `dtype`."""
    acc = torch.zeros(task_vectors[0][key].shape, dtype=dtype, device=device)
    for i in live:
        acc.add_(task_vectors[i][key].to(device=device, dtype=dtype), alpha=float(weights[i]))
    return acc


def merge_per_matrix(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
                     device: torch.device,
                     merge_matrix: Callable[[str, torch.dtype], torch.Tensor]) -> StateDict:
    """Delta per tensor: `merge_matrix(key, work dtype)` for every 2-D tensor (computed on
    `device`), sum_i p_i tau_i for every other one; float32 at least (float64 stays
    float64), the result on CPU in the task vectors' dtype."""
    live = live_clients(weights)
    out: StateDict = {}
    for key, r in task_vectors[0].items():
        work = work_dtype(r.dtype)
        merged = (merge_matrix(key, work) if is_matrix(r)
                  else weighted_mean(task_vectors, weights, key, live, device, work))
        out[key] = merged.to(device="cpu", dtype=r.dtype)
    return out


def numerical_rank_mask(s: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Which singular values `s` of a matrix of `shape` lie above numpy's matrix_rank
    tolerance, s_max * max(shape) * eps (all False for an empty s)."""
    if s.numel() == 0:
        return torch.zeros_like(s, dtype=torch.bool)
    return s > s.max() * max(shape) * torch.finfo(s.dtype).eps


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor P Q^T of a = P S Q^T (the nearest matrix with orthonormal
    columns, or rows for a wide a): the orthogonalisation of TSV's and Iso's code."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def partial_isometry(a: torch.Tensor) -> torch.Tensor:
    """`polar` keeping only the singular pairs above `numerical_rank_mask`: on a matrix of
    full column (or row) rank it is `polar`; on a rank-deficient one, where P Q^T is not
    unique (the null-space columns are LAPACK's choice), it is the unique partial isometry."""
    if a.numel() == 0:
        return torch.zeros_like(a)
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    keep = numerical_rank_mask(s, a.shape)
    return p[:, keep] @ qh[keep, :]
