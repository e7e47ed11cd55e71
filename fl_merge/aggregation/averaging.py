"""Weighted averages: FedAvg / Task Arithmetic, FedNova, FedGMA and Fisher merging.

All are coordinate-wise: each function sees a block ``stacked[K, n]`` of flattened
coordinates (one row per client) and the normalised weights ``p[K]``.
"""

from __future__ import annotations

import torch

from fl_merge.aggregation.registry import number_param, register
from fl_merge.task_vectors import MergeInputError


def _expand(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    return weights.reshape(-1, *([1] * (stacked.dim() - 1)))


def _wsum(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """sum_i w_i stacked[i] as one matrix-vector product (reads each value once)."""
    return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)


def _fedavg_coef(weights, local_steps):
    return weights


def _fednova_coef(weights, local_steps):
    """c_i = K_eff p_i / K_i = p_i * sum_j p_j (K_j / K_i): ratios first, so huge step
    counts cannot overflow K_eff."""
    p = weights.to(torch.float64).cpu()
    steps = local_steps.to(torch.float64).cpu()
    return p * (p[None, :] * (steps[None, :] / steps[:, None])).sum(1)


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


@register("fednova", coordinatewise=True, needs_local_steps=True, coefficients=_fednova_coef)
def fednova(stacked: torch.Tensor, weights: torch.Tensor, local_steps: torch.Tensor) -> torch.Tensor:
    """Delta = K_eff * sum_i p_i tau_i / K_i,  K_eff = sum_i p_i K_i  (FedNova, Wang et al.
    NeurIPS 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous FL").

    Each client's update is normalised by its number of local steps K_i (plain SGD, so the
    normaliser ||a_i||_1 = K_i), removing the bias towards clients that ran longer; K_eff
    restores the step scale. Equal K_i reduce it to FedAvg.
    """
    coef = _fednova_coef(weights.cpu(), local_steps.cpu())
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


def _check_eps(params: dict) -> None:
    if not number_param(params, "eps") >= 0.0:
        raise MergeInputError(f"eps must be >= 0, got {params['eps']}")


@register("fisher", coordinatewise=True, needs_extras=("fisher",), check_params=_check_eps)
def fisher(
    stacked: torch.Tensor, weights: torch.Tensor, extras: dict, eps: float = 1e-8
) -> torch.Tensor:
    """Delta = sum_i p_i F_i tau_i / (sum_i p_i F_i + eps)  (Fisher merging, Matena & Raffel,
    NeurIPS 2022), per coordinate, with F_i client i's diagonal Fisher estimate
    (``extras={"fisher": [dict per client]}``, same keys/shapes as the task vectors).

    The client weights p_i play the role of the paper's lambda_i; with uniform p this is
    sum F_i tau_i / (sum F_i + K eps). Where every F_i is zero the coordinate gets 0 (no
    client has information about it).
    """
    f = extras["fisher"]
    wf = f.mul_(_expand(weights, f).to(f.dtype))
    num = (wf * stacked).sum(0)
    den = wf.sum(0).add_(eps)
    return torch.where(den > 0, num / den, torch.zeros_like(num))
