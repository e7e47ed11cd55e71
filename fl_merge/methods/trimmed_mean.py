"""The coordinate-wise trimmed mean (Yin et al., ICML 2018). Coordinate-wise."""

from __future__ import annotations

import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.merging import streaming
from fl_merge.merging.registry import Paper, number_param, register


def _trim_count(k: int, beta: float) -> int:
    return int(beta * k)


def _check_beta(params: dict) -> None:
    beta = number_param(params, "beta")
    if not 0.0 <= beta <= 0.5:
        raise MergeInputError(f"beta must lie in [0, 0.5], got {params['beta']}")


def _trimmed_min_clients(k: int, params: dict) -> None:
    t = _trim_count(k, params["beta"])
    if k - 2 * t < 1:
        raise MergeInputError(
            f"beta={params['beta']} drops {t} lowest and {t} highest of {k} values per "
            f"coordinate, leaving none"
        )


@register(
    "trimmed_mean", coordinatewise=True, check_params=_check_beta,
    min_clients=_trimmed_min_clients, space={"beta": (0.1, 0.2, 0.3, 0.4)},
    formula="per coordinate, the mean after dropping the floor(beta K) lowest and highest "
            "values; weights ignored",
    paper=Paper("Yin et al., ICML 2018 (the scipy / Flower trim_mean rule)"),
)
def trimmed_mean(stacked: torch.Tensor, weights: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Delta = per coordinate, the mean of tau_1..tau_K after dropping the t = floor(beta*K)
    lowest and t highest values (Yin et al., ICML 2018; scipy/Flower `trim_mean` rule).

    Client weights are ignored (every client counts once), as in the paper and Flower. With
    t = 0 (e.g. beta = 0.1, K < 10) this is the unweighted mean; beta = 0.5 with odd K is
    the median, with even K it drops everything and is refused.
    """
    k = stacked.shape[0]
    t = _trim_count(k, beta)
    if t == 0:
        # sum_i x_i / k as one matrix-vector product (a plain sum could overflow)
        return torch.full((k,), 1.0 / k, dtype=stacked.dtype, device=stacked.device) @ stacked
    keep = list(range(t, k - t))
    rows = streaming.sorted_rows(stacked, keep)
    inv = 1.0 / len(keep)
    out = torch.mul(rows[t], inv)
    for i in keep[1:]:
        out.add_(rows[i], alpha=inv)
    return out
