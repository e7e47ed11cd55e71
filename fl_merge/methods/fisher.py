"""Fisher merging (Matena & Raffel, NeurIPS 2022): the mean weighted per coordinate by
the clients' diagonal Fisher estimates. Coordinate-wise; the clients send their Fisher."""

from __future__ import annotations

import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.merging.blocks import expand_weights
from fl_merge.merging.registry import Needs, Paper, number_param, register


def _check_min_fisher(params: dict) -> None:
    # a positive floor that float32 blocks can hold (and that cannot overflow the weights)
    if not 1e-30 <= number_param(params, "min_fisher") <= 1e30:
        raise MergeInputError(f"min_fisher must lie in [1e-30, 1e30], got {params['min_fisher']}")


@register(
    "fisher", coordinatewise=True, needs=Needs(extras=("fisher",)), check_params=_check_min_fisher,
    formula="sum_i p_i (F_i + f0) tau_i / sum_i p_i (F_i + f0), f0 = min_fisher > 0",
    paper=Paper("Matena & Raffel, NeurIPS 2022, \"Merging Models with Fisher-Weighted Averaging\"",
                code="FusionBench's Fisher merging (its minimal_fisher_weight floor)"),
)
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
    wf = f.mul_(expand_weights(weights, f).to(f.dtype))
    return (wf * stacked).sum(0).div_(wf.sum(0))
