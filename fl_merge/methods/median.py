"""The coordinate-wise median (Yin et al., ICML 2018). Coordinate-wise."""

from __future__ import annotations

import torch

from fl_merge.merging import streaming
from fl_merge.merging.registry import Paper, register


@register(
    "median", coordinatewise=True,
    formula="coordinate-wise median of tau_1..tau_K (even K: the mean of the middle two); "
            "weights ignored",
    paper=Paper("Yin et al., ICML 2018, \"Byzantine-Robust Distributed Learning: Towards "
                "Optimal Statistical Rates\""),
)
def median(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Delta = coordinate-wise median of tau_1..tau_K (Yin et al., ICML 2018,
    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates").

    Even K: the mean of the two middle values (numpy's rule). Client weights are ignored:
    every client counts once, as in the paper and Flower's `aggregate_median` (a weighted
    median would let one client with a large weight decide alone).
    """
    k = stacked.shape[0]
    mid = [k // 2] if k % 2 else [k // 2 - 1, k // 2]
    rows = streaming.sorted_rows(stacked, mid)
    if k % 2:
        return rows[k // 2].clone()
    # halves first: (a + b) / 2 would overflow for two values near the dtype's maximum
    return torch.mul(rows[k // 2 - 1], 0.5).add_(rows[k // 2], alpha=0.5)
