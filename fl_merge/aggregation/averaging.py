"""Weighted averaging: FedAvg and Task Arithmetic (they are the same update)."""

from __future__ import annotations

import torch

from fl_merge.aggregation.registry import register


def _expand(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    return weights.reshape(-1, *([1] * (stacked.dim() - 1)))


@register("fedavg", coordinatewise=True, aliases=("task_arithmetic",))
def fedavg(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Delta = sum_i p_i tau_i  (FedAvg, McMahan et al. 2017; Task Arithmetic, Ilharco et al. 2023).

    Task Arithmetic's theta0 + lambda * sum_i tau_i is this Delta with eta = K * lambda
    under uniform p_i = 1/K (see `eta_for_task_arithmetic`).
    """
    return (_expand(weights, stacked) * stacked).sum(dim=0)


def eta_for_task_arithmetic(lam: float, num_clients: int) -> float:
    """Server learning rate eta that makes one-shot FedAvg equal Task Arithmetic(lambda):
    theta0 + eta * mean_i tau_i = theta0 + lambda * sum_i tau_i  <=>  eta = K * lambda."""
    return num_clients * lam
