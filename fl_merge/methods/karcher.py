"""Karcher mean: the Riemannian (Frechet) mean of the K models' directions on the unit
sphere, scaled by their mean norm, per tensor, as mergekit 0.1.5's `karcher` computes it.
Defined on the models theta_i = theta0 + tau_i, so it needs theta0 (`Needs(theta0=True)`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging import streaming
from fl_merge.merging.registry import Needs, Paper, is_integer, number_param, register

MAX_ITER = 10_000


def _check(params: dict) -> None:
    it = params["max_iter"]
    if not is_integer(it) or not 0 <= it <= MAX_ITER:
        raise MergeInputError(f"max_iter must be an integer in [0, {MAX_ITER}], got {it!r}")
    if number_param(params, "tol") < 0.0:
        raise MergeInputError(f"tol must be >= 0, got {params['tol']}")


def karcher_tensor(xs: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int,
                   tol: float) -> torch.Tensor:
    """mergekit's karcher_merge_tensors on flat tensors xs with weights alphas.

    u_i = x_i / ||x_i|| (0 for a zero tensor); the models with ||x_i|| > tol (and, ours,
    alpha_i > 0: a zero weight) are the valid ones, their alphas renormalised to a_i. Start: m = sum a_i u_i / ||.|| (the first valid
    u when that norm is below tol). Each iteration: v = sum a_i theta_i / sin(theta_i)
    (u_i - cos_i m) over the valid i with theta_i = arccos(clamp(<m, u_i>)) >= tol; stop
    when ||v|| < tol, else m = cos(||v||) m + sin(||v||) v / ||v||, renormalised. Result:
    (sum_i alphas_i ||x_i||) m, over all models; all zero when none is valid."""
    if len(xs) == 1:
        return xs[0]
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if float(n) == 0.0 else x / n for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol and alphas[i] > 0]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mn = torch.linalg.vector_norm(mean)
    mean = u[0].clone() if float(mn) < tol else mean / mn
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            cos = torch.dot(mean, ui).clamp(-1.0, 1.0)
            angle = torch.arccos(cos)
            if float(angle) < tol:
                continue
            tangent += ai * (angle / torch.sin(angle)) * (ui - cos * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    return sum(al * n for al, n in zip(alphas, norms)) * mean


@register(
    "karcher", coordinatewise=False, needs=Needs(theta0=True), check_params=_check,
    lambda_scale="delta",
    per_tensor_exact=True,  # mergekit's mean is per tensor by definition
    formula="per tensor, theta_i = theta0 + tau_i: (sum_i p_i norm(theta_i)) m - theta0, m the "
            "p-weighted Karcher mean of theta_i / norm(theta_i) on the sphere (max_iter, tol); "
            "eta = 1 is mergekit's model",
    paper=Paper("Karcher, Comm. Pure Appl. Math. 1977, \"Riemannian center of mass and "
                "mollifier smoothing\"; as a model merge, mergekit (which cites arXiv:2603.04972)",
                code="arcee-ai/mergekit 0.1.5, mergekit/merge_methods/karcher.py"),
)
def karcher(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    theta0: Mapping[str, torch.Tensor],
    device: torch.device = torch.device("cpu"),
    max_iter: int = 10,
    tol: float = 1e-5,
) -> StateDict:
    """Delta = K(theta_1, ..., theta_K) - theta0 per tensor, theta_i = theta0 + tau_i, with
    K the Karcher (Riemannian, Frechet) mean on the unit sphere (Karcher 1977) as mergekit
    0.1.5 computes it (mergekit/merge_methods/karcher.py, karcher_merge_tensors; see
    `karcher_tensor`): each tensor is one vector; its direction is the weighted Karcher
    mean of the models' unit directions, by at most max_iter Riemannian gradient steps
    (stopping when the tangent's norm falls below tol), and its norm the weighted mean of
    the models' norms. Arithmetic in float64 (mergekit: float32, whose norms overflow for
    entries near its maximum); results agree to float32 rounding. K = 1: the model.

    Convention: like mergekit's, it averages the models themselves, not the task vectors:
    theta0 is only subtracted so that the result has our form theta0 + eta * Delta, and
    eta = 1 is mergekit's model (lambda_scale "delta"; other etas move along the line from
    theta0 through it). The method therefore needs theta0 (merge(..., theta0=...); `fl-merge
    merge` passes its base). mergekit's base_model is ignored by its karcher: the K models
    here are the K clients.

    Weights: mergekit uses alpha_i = 1/K; ours are the clients' p_i (uniform by default, so
    the default is mergekit's computation; karcher_merge_tensors already takes weights).
    tol is absolute, as mergekit's: it also decides which models count as nonzero. No space
    beyond eta (max_iter, tol are numerical settings). Memory: the K models' versions of
    one tensor at a time, in float64.
    """
    ref = task_vectors[0]
    dtype = torch.float64  # norms of float32 entries near its maximum overflow in float32
    alphas = [float(v) for v in weights.to(torch.float64)]
    out = {}
    for key in ref:
        base = theta0[key].reshape(-1).to(device=device, dtype=dtype)
        xs = [base + tv[key].reshape(-1).to(device=device, dtype=dtype) for tv in task_vectors]
        out[key] = karcher_tensor(xs, alphas, int(max_iter), float(tol)) - base
    return streaming.to_output(out, ref)
