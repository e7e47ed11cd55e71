"""SLERP: spherical linear interpolation of exactly two models, per tensor, as mergekit
0.1.5's `slerp` computes it. It is defined on the models theta_i = theta0 + tau_i (their
norms and angle), not on the task vectors, so it needs theta0 (`Needs(theta0=True)`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging import streaming
from fl_merge.merging.registry import Needs, Paper, number_param, register

DOT_THRESHOLD = 0.9995  # mergekit's: |cos| above it interpolates linearly
NORM_EPS = 1e-8  # mergekit's: a norm at most this divides by 1 instead


def _check(params: dict) -> None:
    t = number_param(params, "t")
    if not 0.0 <= t <= 1.0:
        raise MergeInputError(f"t must lie in [0, 1] (0: the first model, 1: the second), got "
                              f"{params['t']}")


def _two_models(num_clients: int, params: dict) -> None:
    if num_clients != 2:
        raise MergeInputError(f"slerp interpolates exactly two models, got {num_clients} (use "
                              "karcher for the spherical mean of K models)")


def slerp_pair(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's slerp(t, a, b) of two flat tensors: c = cos of the angle between
    a / max-safe ||a|| and b / ||b|| (a norm <= 1e-8 counts as 1), clamped to [-1, 1];
    |c| > 0.9995: (1 - t) a + t b; else, with w = arccos c,
    sin((1 - t) w) / sin w * a + sin(t w) / sin w * b (on the raw, unnormalised a and b)."""
    tt = torch.tensor(t, dtype=a.dtype, device=a.device)
    if a.numel() == 0:
        return (1 - tt) * a + tt * b
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > NORM_EPS, na, 1.0)
    nb = torch.where(nb > NORM_EPS, nb, 1.0)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if bool(dot.abs() > DOT_THRESHOLD):
        return (1 - tt) * a + tt * b
    omega = torch.acos(dot)
    s = torch.sin(omega)
    return (torch.sin((1 - tt) * omega) / s) * a + (torch.sin(tt * omega) / s) * b

@register(
    "slerp", coordinatewise=False, needs=Needs(theta0=True), check_params=_check,
    min_clients=_two_models, lambda_scale="delta",
    per_tensor_exact=True,  # mergekit's angle is per tensor by definition
    space={"t": (0.25, 0.5, 0.75)},
    formula="per tensor, theta_i = theta0 + tau_i (K = 2): slerp(t; theta_1, theta_2) - theta0, "
            "linear (1 - t) theta_1 + t theta_2 when abs(cos) > 0.9995; eta = 1 is mergekit's model",
    paper=Paper("Shoemake, SIGGRAPH 1985, \"Animating rotation with quaternion curves\" (SLERP); "
                "as a model merge, mergekit",
                code="arcee-ai/mergekit 0.1.5, mergekit/merge_methods/slerp.py"),
)
def slerp(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    theta0: Mapping[str, torch.Tensor],
    device: torch.device = torch.device("cpu"),
    t: float = 0.5,
) -> StateDict:
    """Delta = slerp(t; theta_1, theta_2) - theta0 per tensor, theta_i = theta0 + tau_i: the
    spherical interpolation of the two fine-tuned models (Shoemake 1985) as mergekit 0.1.5
    computes it (mergekit/merge_methods/slerp.py, `slerp`; see `slerp_pair`): each tensor
    is one vector, normalised by its own norm; nearly colinear or antipodal tensors
    (|cos| > 0.9995) are interpolated linearly. Arithmetic in float64 (mergekit: float32, whose
    norms overflow for entries near its maximum); results agree to float32 rounding.

    Convention: mergekit's slerp interpolates the models themselves, base_model (t = 0) and
    the other one (t = 1); theta0, the pretrained model, plays no part in its arithmetic.
    Here the first client is mergekit's base_model and the second its other model; theta0
    is only subtracted so that the result has our form, theta0 + eta * Delta, and eta = 1
    is mergekit's model exactly (lambda_scale "delta"; eta != 1 moves along the line from
    theta0 through it, which mergekit does not do). Because the angle and norms are the
    models', not the task vectors', the method needs theta0 (merge(..., theta0=...); `fl-merge
    merge` passes its base) and is not slerp of tau_1 and tau_2.

    Ours: t is one number for every tensor (mergekit also takes per-layer gradients of t
    through its filters); its default 0.5 is ours (mergekit requires t), and at 0.5 the
    result does not depend on the clients' order (swapping them is t -> 1 - t). The
    clients' weights p_i are not used (mergekit's slerp has none). K != 2 is refused
    before any training (min_clients). Memory: the two models' versions of one tensor, in
    float64.
    """
    ref = task_vectors[0]
    dtype = torch.float64  # norms of float32 entries near its maximum overflow in float32
    out = {}
    for key in ref:
        base = theta0[key].reshape(-1).to(device=device, dtype=dtype)
        a = base + task_vectors[0][key].reshape(-1).to(device=device, dtype=dtype)
        b = base + task_vectors[1][key].reshape(-1).to(device=device, dtype=dtype)
        out[key] = slerp_pair(a, b, float(t)).sub_(base)
    return streaming.to_output(out, ref)
