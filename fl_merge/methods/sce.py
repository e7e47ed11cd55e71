"""SCE, Select-Calculate-Erase (FuseChat 2.0's merge, Wan et al. 2024), as mergekit 0.1.5's
`sce` computes it: per tensor, keep the coordinates where the clients disagree most (top-k
variance), weigh each client by its mean squared update, erase the minority signs. Per
tensor by definition, so `fl-merge merge`'s per-tensor run is the method itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging import streaming
from fl_merge.merging.blocks import task_vectors_dtype
from fl_merge.merging.registry import Paper, number_param, register


def _check(params: dict) -> None:
    s = number_param(params, "select_topk")
    if not 0.0 < s <= 1.0:
        raise MergeInputError(f"select_topk must lie in (0, 1], got {params['select_topk']}")


def sce_tensor(x: torch.Tensor, c: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE on one tensor's clients x[K, n] (overwritten) with relative weights c[K] (max 1).

    Select: where select_topk < 1, keep the int(select_topk * m) coordinates of largest
    variance over the clients (population variance; m = how many are nonzero), zero the
    rest. Calculate: w_i = c_i mean_j x_ij^2, normalised to sum 1 (uniform 1/K when the
    sum is below 1e-6); variance and squares in float64 (mergekit: the tensor's dtype,
    where entries near the dtype's maximum overflow). Erase: s = +1 where sum_i c_i x_ij >= 0 else -1; Delta_j = sum_i
    w_i [sign x_ij = s] x_ij / max(sum_i w_i [sign x_ij = s], 1e-6)."""
    k, n = x.shape
    if select_topk < 1.0 and n:
        var = x.double().var(0, unbiased=False)  # float64: squares of large entries overflow
        top = int(int(torch.count_nonzero(var)) * select_topk)
        keep = torch.zeros(n, dtype=x.dtype, device=x.device)
        if top > 0:
            keep[torch.topk(var.abs(), top, largest=True).indices] = 1
        x.mul_(keep)
    cx = x * c[:, None]
    elected = torch.where(cx.sum(0) >= 0, 1.0, -1.0).to(x.dtype)
    agree = (torch.sign(x) == elected).to(x.dtype)
    w = x.double().square().mean(1) * c if n else torch.zeros(k, dtype=torch.float64, device=x.device)
    total = float(w.sum())
    w = (torch.full_like(w, 1.0 / k) if abs(total) < 1e-6 else w / total).to(x.dtype)
    erased = agree * w[:, None]
    return (x * erased).sum(0) / erased.sum(0).clamp(min=1e-6)


@register(
    "sce", coordinatewise=False, check_params=_check, lambda_scale="delta",
    per_tensor_exact=True,  # selection, weights and erasure are per tensor by definition
    space={"select_topk": (0.1, 0.3, 0.5, 1.0)},
    formula="per tensor: keep the top select_topk coordinates by variance over clients, "
            "w_i ~ p_i mean(tau_i^2), elect s = sign(sum_i p_i tau_i) (0 -> +), "
            "sum_{agree} w_i tau_i / sum_{agree} w_i",
    paper=Paper("Wan et al. 2024, FuseChat 2.0's SCE merge (arXiv:2408.07990, the reference "
                "mergekit's sce cites)",
                code="arcee-ai/mergekit 0.1.5, mergekit/merge_methods/sce.py"),
)
def sce(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    select_topk: float = 1.0,
) -> StateDict:
    """SCE, Select-Calculate-Erase (Wan et al. 2024, arXiv:2408.07990, FuseChat 2.0's merge),
    as mergekit 0.1.5 computes it (mergekit/merge_methods/sce.py), per tensor:

    1. Select: with select_topk < 1, the int(select_topk * m) coordinates of largest
       variance var_j = (1/K) sum_i (tau_ij - mean_i tau_ij)^2 are kept in every client,
       m = #{j : var_j != 0}; the others are zeroed (int(...) = 0 zeroes the tensor).
    2. Calculate: w_i = c_i mean_j tau_ij^2 over the (selected) tensor, w /= sum_i w_i,
       uniform 1/K instead when sum_i w_i < 1e-6 (mergekit's threshold, absolute: tensors of
       small updates fall back to equal weights).
    3. Erase: s_j = +1 where sum_i c_i tau_ij >= 0 else -1; clients whose entry's sign is
       not s_j (a zero entry has none) drop out: Delta_j = sum_i w_i a_ij tau_ij /
       max(sum_i w_i a_ij, 1e-6), a_ij = [sign tau_ij = s_j].

    Weights: mergekit's sce takes none (c_i = 1). Ours: c_i = p_i / max_j p_j multiplies
    each client's squared-magnitude weight and its vote in the sign election, so uniform
    p is mergekit's computation exactly (c_i = 1), and num-examples weighting still counts.
    Lambda: mergekit's model is base + Delta (no lambda): lambda_scale "delta", eta = 1 is
    mergekit's model. The space (select_topk 0.1, 0.3, 0.5, 1) is ours; mergekit's default
    1 selects everything. select_topk <= 0 (mergekit: the base model) is refused. Ties at
    the k-th variance are broken by torch.topk, as in mergekit.
    Memory: the K clients' versions of one tensor at a time.
    """
    ref = task_vectors[0]
    dtype = task_vectors_dtype(task_vectors)
    p = weights.to(torch.float64)
    c = (p / p.max()).to(device=device, dtype=dtype)
    out = {}
    for key in ref:
        x = torch.stack([tv[key].reshape(-1).to(device=device, dtype=dtype) for tv in task_vectors])
        out[key] = sce_tensor(x, c, float(select_topk))
    return streaming.to_output(out, ref)
