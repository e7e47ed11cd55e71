"""FedGMA (Tenison et al. 2022): the weighted mean, damped where the clients disagree on
the sign. Coordinate-wise."""

from __future__ import annotations

import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.merging.blocks import expand_weights, weighted_sum
from fl_merge.merging.registry import Paper, number_param, register


def _check_rho(params: dict) -> None:
    rho = params["rho"]
    if not 0.0 <= number_param(params, "rho") <= 1.0:
        raise MergeInputError(f"rho must lie in [0, 1], got {rho}")


@register(
    "fedgma", coordinatewise=True, check_params=_check_rho,
    space={"rho": tuple(round(0.1 * i, 1) for i in range(1, 10))},
    formula="m * sum_i p_i tau_i, a = abs(sum_i p_i sign tau_i), m = 1 where a >= rho else a",
    paper=Paper("Tenison et al. 2022, \"Gradient Masked Averaging for Federated Learning\"",
                code="SilviaTao/one_shot_fl_task_arithmetic (rho grid 0.1..0.9)"),
)
def fedgma(stacked: torch.Tensor, weights: torch.Tensor, rho: float = 0.5) -> torch.Tensor:
    """Delta = m * sum_i p_i tau_i,  a = |sum_i p_i sign(tau_i)|,  m = 1 where a >= rho else a
    (FedGMA, Tenison et al. 2022, "Gradient Masked Averaging for Federated Learning").

    Coordinates on whose sign the clients agree (weighted agreement a >= rho) pass at full
    strength; the others are damped by their agreement a. rho = 0 is FedAvg.
    """
    w = expand_weights(weights, stacked).to(stacked.dtype)
    agree = (w * torch.sign(stacked)).sum(0).abs_()
    mask = torch.where(agree >= rho, torch.ones_like(agree), agree)
    return mask.mul_(weighted_sum(weights, stacked))
