"""Centered clipping (Karimireddy, He & Jaggi, ICML 2021). Whole-vector: norms over the
flattened update, streamed through the clients' Gram matrix."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict, all_finite
from fl_merge.merging import streaming
from fl_merge.merging.blocks import check_iters, task_vectors_dtype
from fl_merge.merging.registry import Derived, Paper, number_param, register
from fl_merge.methods.median import median

CCLIP_POINTS = 8  # radii per round in the search


def task_vector_norms(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """||tau_i||_2 over every merged tensor together (float64)."""
    return [math.sqrt(sum(float(v.double().pow(2).sum()) for v in tv.values())) for tv in task_vectors]


def cclip_radii(task_vectors: Sequence[Mapping[str, torch.Tensor]], points: int = CCLIP_POINTS
                ) -> list[float]:
    """CClip's radius grid: `points` evenly spaced values from min ||tau_i|| towards
    max ||tau_i||, the maximum left out (there nobody is clipped: plain averaging); one value
    when every norm is equal. Radii <= 0 are dropped (a zero update). As the one-shot FL
    task-arithmetic code searches it (SilviaTao/one_shot_fl_task_arithmetic)."""
    norms = task_vector_norms(task_vectors)
    lo, hi = min(norms), max(norms)
    values = [lo] if hi <= lo else [float(v) for v in np.linspace(lo, hi, points, endpoint=False)]
    return [v for v in values if v > 0]


def _flat_center(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    center,
    weights: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Flat per-key starting point on `device` for the task vectors' keys: zeros, the
    weighted mean, the coordinate-wise median, or a given state dict (its tensors of those
    keys)."""
    ref = task_vectors[0]
    if isinstance(center, Mapping):
        return {k: center[k].reshape(-1).to(device=device, dtype=dtype).clone() for k in ref}
    out = streaming.empty_like_flat(ref, device, dtype)
    if center == "zero":
        return out
    pw = weights.to(device=device, dtype=dtype)
    for key, s, e, x, _ in streaming.iter_blocks(task_vectors, device, dtype):
        out[key][s:e] = pw @ x if center == "mean" else median(x, pw)
    return out


def _center_rows(center, weights: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """The starting point block by block, for `streaming.gram`: the coordinate-wise median
    of the block (the values `_flat_center` holds) or the given state dict's slice."""
    if isinstance(center, Mapping):
        return lambda key, s, e, x: center[key].reshape(-1)[s:e].to(device=device, dtype=dtype)
    pw = weights.to(device=device, dtype=dtype)
    return lambda key, s, e, x: median(x, pw)


def cclip_pass(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
               device: torch.device, params: dict) -> dict:
    """CClip's global statistics (its declared pass, fl_merge/merging/passes.py):
    ``coefficients``, float64 (a, c) with v = sum_j c_j tau_j (+ a v0 for a median or given
    center, the last entry), from the float64 Gram matrix of (tau_1..tau_K, v0) streamed in
    one pass (v0 computed block by block, never whole) and the iterations run on it."""
    k = len(task_vectors)
    dtype = task_vectors_dtype(task_vectors)
    tau, center = float(params["tau"]), params["center"]
    p = weights.to(torch.float64).cpu()
    if isinstance(center, Mapping):
        _check_center(center, task_vectors[0])
    if isinstance(center, Mapping) or center == "median":
        g = streaming.gram(task_vectors, device, dtype, also=_center_rows(center, weights, device, dtype))
        coef = torch.zeros(k + 1, dtype=torch.float64)
        coef[k] = 1.0
    else:
        g = streaming.gram(task_vectors, device, dtype)
        coef = p.clone() if center == "mean" else torch.zeros(k, dtype=torch.float64)
    for _ in range(int(params["iters"])):
        d = streaming.sq_dist_to_combination(g, coef)[:k].sqrt()
        w = p * torch.where(d > tau, tau / d.clamp_min(1e-300), torch.ones_like(d))
        coef = coef * (1.0 - w.sum())
        coef[:k] += w
    return {"coefficients": coef}


_CENTERS = ("zero", "mean", "median")


def _check_cclip(params: dict) -> None:
    if not number_param(params, "tau") > 0:
        raise MergeInputError(f"tau (clipping radius) must be > 0, got {params['tau']}")
    check_iters(params)
    c = params["center"]
    if not isinstance(c, Mapping) and not (isinstance(c, str) and c in _CENTERS):
        raise MergeInputError(f"center must be one of {_CENTERS} or a state dict, got {c!r}")


@register(
    "cclip", coordinatewise=False, check_params=_check_cclip,
    space={"tau": Derived(cclip_radii, "linspace(min ||tau_i||, max ||tau_i||), end point excluded")},
    formula="v <- v + sum_i p_i (tau_i - v) min(1, tau / norm(tau_i - v)), iters times from v = center",
    paper=Paper("Karimireddy, He & Jaggi, ICML 2021, \"Learning from History for Byzantine "
                "Robust Optimization\"",
                code="SilviaTao/one_shot_fl_task_arithmetic (radius grid)"),
    global_pass=cclip_pass,  # the coefficients of v: a large-model round merges it by groups
)
def cclip(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    tau: float = 1.0,
    iters: int = 1,
    center="zero",
    stats: Mapping | None = None,
) -> StateDict:
    """Centered clipping (Karimireddy, He & Jaggi, ICML 2021, "Learning from History for
    Byzantine Robust Optimization"): starting from v = center, repeat `iters` times
        v <- v + sum_i p_i (tau_i - v) * min(1, tau / ||tau_i - v||),
    the norm taken over the whole flattened task vector (all tensors together).

    center: "zero" (the paper's v0 = 0 in one-shot use: the previous aggregate is theta0),
    "mean" (weighted mean), "median" (coordinate-wise median) or a state dict.

    Streaming: every iterate is v = a v0 + sum_j c_j tau_j, so all distances follow from
    the float64 Gram matrix of (tau_1..tau_K, v0), built in one streamed pass (v0 block by
    block); the iterations update (a, c) only (`cclip_pass`) and a last pass forms v. Two
    passes over the clients whatever `iters` (three with center="median"), memory one
    block plus the result.
    stats (`cclip_pass` on the whole task vectors): its coefficients are taken, and these
    task vectors may be any subset of the whole one's tensors (a given center is read for
    their keys only): exactly those tensors of the whole merge.
    """
    if stats is None:
        stats = cclip_pass(task_vectors, weights, device,
                           {"tau": tau, "iters": iters, "center": center})
    k = len(task_vectors)
    coef = stats["coefficients"]
    extra = None
    if len(coef) > k:
        v0 = _flat_center(task_vectors, center, weights, device, task_vectors_dtype(task_vectors))
        extra = (float(coef[k]), v0)
    return streaming.linear_combination(task_vectors, coef[:k], device, extra=extra)


def _check_center(center: Mapping, ref: Mapping[str, torch.Tensor]) -> None:
    """A state-dict center must match the task vectors: same keys and shapes, finite
    floating-point tensors."""
    if set(center) != set(ref):
        diff = sorted(set(center) ^ set(ref), key=str)
        raise MergeInputError(f"center has different parameters than the task vectors: {diff[:5]}")
    for key, r in ref.items():
        v = center[key]
        if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
            raise MergeInputError(f"center['{key}'] must be a floating-point tensor")
        if tuple(v.shape) != tuple(r.shape):
            raise MergeInputError(
                f"center['{key}'] has shape {tuple(v.shape)}, the task vectors have {tuple(r.shape)}"
            )
        if not all_finite(v):
            raise MergeInputError(f"center['{key}'] contains NaN or Inf")

