"""FedNova (Wang et al., NeurIPS 2020): task vectors normalised by each client's a_i, the
normaliser of the optimizer it ran. Coordinate-wise and linear."""

from __future__ import annotations

import math
import numbers

import torch

from fl_merge.merging.blocks import weighted_sum
from fl_merge.merging.registry import Needs, Paper, register


def _fednova_coef(weights, normalisers):
    """c_i = a_eff p_i / a_i = p_i * sum_j p_j (a_j / a_i): ratios first, so huge
    normalisers cannot overflow a_eff."""
    p = weights.to(torch.float64).cpu()
    a = normalisers.to(torch.float64).cpu()
    return p * (p[None, :] * (a[None, :] / a[:, None])).sum(1)


FEDNOVA_OPTIMIZERS = ("sgd", "adam", "adamw")


def fednova_normaliser(steps: int, momentum: float = 0.0, optimizer: str = "sgd") -> float:
    """FedNova's normaliser ||a_i||_1 for a client that ran `steps` local steps of `optimizer`
    (Wang et al., NeurIPS 2020, "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", Sec. 4 and App. on momentum).

    A local solver whose total update is tau_i = -lr * sum_k a_ik g_ik (g_ik the k-th
    stochastic gradient) has a_i = [a_i1, ..., a_it]; FedNova divides tau_i by ||a_i||_1.

    * plain SGD (momentum 0): a_ik = 1, so ||a_i||_1 = t.
    * SGD with heavy-ball momentum r (torch.optim.SGD: buffer b <- r b + g, step -lr b; no
      dampening, no Nesterov): gradient k enters the remaining t - k + 1 steps with weights
      1, r, r^2, ..., so a_ik = (1 - r^(t-k+1)) / (1 - r) and
      ||a_i||_1 = [t - r (1 - r^t) / (1 - r)] / (1 - r)   (t=1: 1; t=2: 2 + r).
    * Adam / AdamW: ours, a_i = t (as plain SGD). Adam's step is lr * m_hat / (sqrt(v_hat)
      + eps) with bias-corrected moments: under a constant gradient every step has the same
      size lr (per coordinate, up to eps), so the displacement grows linearly in t, not
      like heavy-ball momentum's ~t/(1-r); the normalised update is then the mean step, as
      FedNova intends. Its per-coordinate preconditioning is not a scalar a_i, so no exact
      normaliser exists; `momentum` (Adam's beta1) is ignored.

    Weight decay is not modelled (the clients fine-tune without it).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real) \
            or not float(steps).is_integer() or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if optimizer not in FEDNOVA_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {FEDNOVA_OPTIMIZERS}, got {optimizer!r}")
    t = float(steps)
    if optimizer != "sgd":
        return t
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    r = float(momentum)
    if r == 0.0:
        return t
    one_minus_rt = -math.expm1(t * math.log(r))  # 1 - r^t without cancellation
    return (t - r * one_minus_rt / (1.0 - r)) / (1.0 - r)


@register(
    "fednova", coordinatewise=True, needs=Needs(normalisers=True), coefficients=_fednova_coef,
    formula="a_eff sum_i p_i tau_i / a_i, a_eff = sum_i p_i a_i; a_i = norm_1(a_i) of the "
            "optimizer client i ran (t_i for SGD, [t_i - r(1 - r^t_i)/(1 - r)]/(1 - r) with "
            "momentum r, t_i for Adam, ours)",
    paper=Paper("Wang et al., NeurIPS 2020, \"Tackling the Objective Inconsistency Problem in "
                "Heterogeneous Federated Optimization\""),
)
def fednova(stacked: torch.Tensor, weights: torch.Tensor, normalisers: torch.Tensor) -> torch.Tensor:
    """Delta = a_eff * sum_i p_i tau_i / a_i,  a_eff = sum_i p_i a_i  (FedNova, Wang et al.
    NeurIPS 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous FL").

    a_i = ||a_i||_1 is client i's normaliser for the optimizer it ran (`fednova_normaliser`:
    t_i for plain SGD, [t_i - r(1 - r^t_i)/(1 - r)]/(1 - r) for SGD with momentum r),
    reported by the client; `merge(..., normalisers=...)`. A client without one gets the
    plain-SGD normaliser a_i = t_i from `local_steps`, with a warning. Dividing by a_i
    removes the bias towards clients that ran longer; a_eff restores the step scale. Equal
    a_i reduce it to FedAvg.
    """
    coef = _fednova_coef(weights.cpu(), normalisers.cpu())
    return weighted_sum(coef.to(device=stacked.device, dtype=stacked.dtype), stacked)
