"""FedAvg (McMahan et al. 2017), which one-shot is Task Arithmetic (Ilharco et al. 2023):
the weighted mean of the task vectors. Coordinate-wise and linear."""

from __future__ import annotations

import torch

from fl_merge.merging.blocks import weighted_sum
from fl_merge.merging.registry import Paper, register


def _fedavg_coef(weights, **_):
    return weights


@register(
    "fedavg", coordinatewise=True, aliases=("task_arithmetic",), coefficients=_fedavg_coef,
    formula="sum_i p_i tau_i (Task Arithmetic's lambda: eta = K lambda)",
    paper=Paper("McMahan et al., AISTATS 2017; Task Arithmetic: Ilharco et al., ICLR 2023"),
)
def fedavg(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Delta = sum_i p_i tau_i  (FedAvg, McMahan et al. 2017; Task Arithmetic, Ilharco et al. 2023).

    Task Arithmetic's theta0 + lambda * sum_i tau_i is this Delta with eta = K * lambda
    under uniform p_i = 1/K (see `eta_for_task_arithmetic`).
    """
    return weighted_sum(weights, stacked)


def eta_for_task_arithmetic(lam: float, num_clients: int) -> float:
    """Server learning rate eta that makes one-shot FedAvg equal Task Arithmetic(lambda):
    theta0 + eta * mean_i tau_i = theta0 + lambda * sum_i tau_i  <=>  eta = K * lambda."""
    return num_clients * lam
