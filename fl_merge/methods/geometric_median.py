"""The geometric median by smoothed Weiszfeld (RFA, Pillutla, Kakade & Harchaoui, IEEE
TSP 2022). Whole-vector: distances from the clients' Gram matrix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging import streaming
from fl_merge.merging.blocks import check_iters, task_vectors_dtype
from fl_merge.merging.registry import Paper, number_param, register


def _check_gm(params: dict) -> None:
    if not number_param(params, "nu") > 0:
        raise MergeInputError(f"nu (smoothing) must be > 0, got {params['nu']}")
    check_iters(params)


def geometric_median_pass(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
                          device: torch.device, params: dict) -> dict:
    """The geometric median's global statistics (its declared pass,
    fl_merge/merging/passes.py): ``coefficients`` c, float64, with v = sum_j c_j tau_j, from
    the float64 Gram matrix streamed in one pass and the Weiszfeld iterations run on it."""
    p = weights.to(torch.float64).cpu()
    g = streaming.gram(task_vectors, device, task_vectors_dtype(task_vectors))
    c = p.clone()
    for _ in range(int(params["iters"])):
        d = streaming.sq_dist_to_combination(g, c).sqrt()
        beta = p / d.clamp_min(float(params["nu"]))
        c = beta / beta.sum()
    return {"coefficients": c}


@register(
    "geometric_median", coordinatewise=False, check_params=_check_gm,
    global_pass=geometric_median_pass,  # its coefficients: a large-model round merges by groups
    formula="argmin_v sum_i p_i norm(v - tau_i), smoothed Weiszfeld from the weighted mean",
    paper=Paper("Pillutla, Kakade & Harchaoui, IEEE TSP 2022, \"Robust Aggregation for "
                "Federated Learning\""),
)
def geometric_median(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    nu: float = 1e-6,
    iters: int = 10,
    stats: Mapping | None = None,
) -> StateDict:
    """Delta ~= argmin_v sum_i p_i ||v - tau_i|| by the smoothed Weiszfeld algorithm
    (RFA, Pillutla, Kakade & Harchaoui, IEEE TSP 2022): from v = sum p_i tau_i, repeat
        beta_i = p_i / max(nu, ||v - tau_i||),   v <- sum_i beta_i tau_i / sum_i beta_i
    `iters` times, norms over the whole flattened vector.

    Streaming: every iterate is v = sum_j c_j tau_j, so ||v - tau_i||^2 = G_ii - 2(Gc)_i +
    c'Gc from the float64 Gram matrix G (one streamed pass); the iterations run on the K
    coefficients and one more pass forms v: two passes whatever `iters`, memory one block
    plus the result. (Distances below ~1e-7 of the norms are not resolved, i.e. well under
    any useful nu relative to the update size.) stats (`geometric_median_pass` on the whole
    task vectors): its coefficients are taken, these task vectors may be any subset of its
    tensors.
    """
    if stats is None:
        stats = geometric_median_pass(task_vectors, weights, device, {"nu": nu, "iters": iters})
    return streaming.linear_combination(task_vectors, stats["coefficients"], device)
