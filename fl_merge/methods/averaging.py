"""Weighted averages: FedAvg / Task Arithmetic, FedNova, FedGMA and Fisher merging.

All are coordinate-wise: each function sees a block ``stacked[K, n]`` of flattened
coordinates (one row per client) and the normalised weights ``p[K]``.
"""

from __future__ import annotations

import math
import numbers

import torch

from fl_merge.merging.registry import number_param, register
from fl_merge.core.task_vectors import MergeInputError


def _expand(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    return weights.reshape(-1, *([1] * (stacked.dim() - 1)))


def _wsum(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """sum_i w_i stacked[i] as one matrix-vector product (reads each value once)."""
    return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)


def _fedavg_coef(weights, **_):
    return weights


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


@register("fedavg", coordinatewise=True, aliases=("task_arithmetic",), coefficients=_fedavg_coef)
def fedavg(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Delta = sum_i p_i tau_i  (FedAvg, McMahan et al. 2017; Task Arithmetic, Ilharco et al. 2023).

    Task Arithmetic's theta0 + lambda * sum_i tau_i is this Delta with eta = K * lambda
    under uniform p_i = 1/K (see `eta_for_task_arithmetic`).
    """
    return _wsum(weights, stacked)


def eta_for_task_arithmetic(lam: float, num_clients: int) -> float:
    """Server learning rate eta that makes one-shot FedAvg equal Task Arithmetic(lambda):
    theta0 + eta * mean_i tau_i = theta0 + lambda * sum_i tau_i  <=>  eta = K * lambda."""
    return num_clients * lam


@register("fednova", coordinatewise=True, needs_normalisers=True, coefficients=_fednova_coef)
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
    return _wsum(coef.to(device=stacked.device, dtype=stacked.dtype), stacked)


def _check_rho(params: dict) -> None:
    rho = params["rho"]
    if not 0.0 <= number_param(params, "rho") <= 1.0:
        raise MergeInputError(f"rho must lie in [0, 1], got {rho}")


@register("fedgma", coordinatewise=True, check_params=_check_rho)
def fedgma(stacked: torch.Tensor, weights: torch.Tensor, rho: float = 0.5) -> torch.Tensor:
    """Delta = m * sum_i p_i tau_i,  a = |sum_i p_i sign(tau_i)|,  m = 1 where a >= rho else a
    (FedGMA, Tenison et al. 2022, "Gradient Masked Averaging for Federated Learning").

    Coordinates on whose sign the clients agree (weighted agreement a >= rho) pass at full
    strength; the others are damped by their agreement a. rho = 0 is FedAvg.
    """
    w = _expand(weights, stacked).to(stacked.dtype)
    agree = (w * torch.sign(stacked)).sum(0).abs_()
    mask = torch.where(agree >= rho, torch.ones_like(agree), agree)
    return mask.mul_(_wsum(weights, stacked))


def _check_min_fisher(params: dict) -> None:
    # a positive floor that float32 blocks can hold (and that cannot overflow the weights)
    if not 1e-30 <= number_param(params, "min_fisher") <= 1e30:
        raise MergeInputError(f"min_fisher must lie in [1e-30, 1e30], got {params['min_fisher']}")


@register("fisher", coordinatewise=True, needs_extras=("fisher",), check_params=_check_min_fisher)
def fisher(
    stacked: torch.Tensor, weights: torch.Tensor, extras: dict, min_fisher: float = 1e-6
) -> torch.Tensor:
    """Delta = sum_i p_i (F_i + f0) tau_i / sum_i p_i (F_i + f0)  (Fisher merging, Matena &
    Raffel, NeurIPS 2022), per coordinate, with F_i client i's diagonal Fisher estimate
    (``extras={"fisher": [dict per client]}``, same keys/shapes as the task vectors) and the
    floor f0 = min_fisher > 0 added to every F_i, as FusionBench's Fisher merging does with
    its ``minimal_fisher_weight`` (default 1e-6 there too).

    The client weights p_i play the role of the paper's lambda_i. The floor makes the
    denominator >= f0 > 0: where no client's Fisher is informative (F_i << f0, e.g. the
    many exactly-zero entries of unused units) a coordinate falls back to the plain mean
    sum_i p_i tau_i, and K=1 returns tau exactly.
    """
    f = extras["fisher"].add_(min_fisher)
    wf = f.mul_(_expand(weights, f).to(f.dtype))
    return (wf * stacked).sum(0).div_(wf.sum(0))
