"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): mask each tensor's largest and
smallest task-vector entries, then average. Per tensor by definition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging import conventions, streaming
from fl_merge.merging.blocks import task_vectors_dtype
from fl_merge.merging.registry import Paper, number_param, register


def _check_breadcrumbs(params: dict) -> None:
    b, g = number_param(params, "beta"), number_param(params, "gamma")
    if not (0.0 <= b < 1.0 and 0.0 <= g < 1.0 and b + g < 1.0):
        raise MergeInputError(
            f"beta and gamma must lie in [0, 1) with beta + gamma < 1, got beta={b}, gamma={g}"
        )
    conventions.check_convention(params)


def breadcrumbs_mask(x: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Bool mask of one flat tensor keeping |x| ranks in [floor(gamma n), n - floor(beta n)):
    the floor(beta n) largest and floor(gamma n) smallest magnitudes are dropped (entries
    tied with a cut-off value are dropped with it). Reference helper; `breadcrumbs` finds
    the same cut-offs by a streamed radix select."""
    n = x.numel()
    top, bottom = int(beta * n), int(gamma * n)
    a = x.abs()
    keep = torch.ones(n, dtype=torch.bool, device=x.device)
    if top + bottom >= n:
        return ~keep
    if bottom > 0:
        keep &= a > torch.kthvalue(a, bottom).values
    if top > 0:
        keep &= a < torch.kthvalue(a, n - top + 1).values
    return keep


@register(
    "breadcrumbs", coordinatewise=False, check_params=_check_breadcrumbs,
    per_tensor_exact=True, space={"gamma": (0.8, 0.85, 0.9)},
    formula="per tensor and client, mask the top beta and bottom gamma fraction of abs(tau_i), "
            "then sum_i p_i m_i tau_i (convention=mergekit: ties at the cut-offs split by sort order)",
    paper=Paper("Davari & Belilovsky, ECCV 2024, \"Model Breadcrumbs: Scaling Multi-Task "
                "Model Merging with Sparse Masks\""),
)
def breadcrumbs(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    beta: float = 0.01,
    gamma: float = 0.85,
    convention: str = "fl-merge",
) -> StateDict:
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): per tensor and per client, mask
    out the beta fraction of largest-|tau| entries (outliers) and the gamma fraction of
    smallest (noise), then Delta = sum_i p_i m_i tau_i.

    Counts are floor(beta n) and floor(gamma n) for a tensor of n entries; entries tied
    with a cut-off value are dropped with it. Mean convention: the paper's
    theta0 + alpha * sum_i m_i tau_i is eta = K * alpha here. Defaults (drop top 1%,
    bottom 85%) are ours, in the sparse regime the paper studies.
    Cut-offs per (tensor, client) by the streamed radix select of `streaming.abs_order_stats`;
    memory one [K, n] block plus the result.

    convention="mergekit" (mergekit 0.1.5's "breadcrumbs": sparsify.magnitude_outliers,
    no rescale, no sign consensus): the same counts, but exactly n - floor(beta n) -
    floor(gamma n) entries are kept, the ranks [floor(gamma n), n - floor(beta n)) of
    torch.sort(|tau_i|) (ties at a cut-off split by the sort's order,
    `conventions.rank_window`), and Delta = sum_i p_i m_i tau_i summed row by row as mergekit
    does. Parameters: mergekit's gamma is our beta (the top fraction dropped) and its
    density the kept fraction, from which it derives the bottom count n - floor(density n)
    - floor(beta n): our gamma = 1 - beta - density where the floors agree; at density >= 1
    mergekit masks nothing at all. Its weights are K p_i and its lambda ours (eta = K
    lambda); its breadcrumbs_ties (with TIES's sign vote) has no fl-merge counterpart.
    """
    ref = task_vectors[0]
    dtype = task_vectors_dtype(task_vectors)
    k = len(task_vectors)
    pw = weights.to(device=device, dtype=dtype)
    if convention == "mergekit":
        out = {}
        for key, r in ref.items():
            n = r.numel()
            x = torch.stack([conventions.rank_window(tv[key].reshape(-1).to(device=device, dtype=dtype),
                                                     int(gamma * n), int(beta * n)) for tv in task_vectors])
            out[key] = (x * pw.reshape(-1, 1)).sum(0)
        return streaming.to_output(out, ref)
    out = streaming.empty_like_flat(ref, device, dtype)
    for key, r in ref.items():
        n = r.numel()
        top, bottom = int(beta * n), int(gamma * n)
        if top + bottom >= n:
            continue  # everything masked: this tensor contributes 0
        # ranks (1-based, ascending) of the two cut-offs: the bottom-th smallest |tau| and
        # the top-th largest one
        want = [([bottom] if bottom > 0 else []) + ([n - top + 1] if top > 0 else [])] * k
        stats = streaming.abs_order_stats(task_vectors, want, device, dtype, keys=[key])
        lo = torch.tensor([st[0] if bottom > 0 else -1.0 for st in stats], dtype=dtype, device=device)
        hi = torch.tensor([st[-1] if top > 0 else float("inf") for st in stats], dtype=dtype, device=device)
        lo, hi = lo.reshape(k, 1), hi.reshape(k, 1)
        for _, s, e, x, _ in streaming.iter_blocks(task_vectors, device, dtype, keys=[key]):
            a = x.abs()
            x.mul_((a > lo) & (a < hi))
            out[key][s:e] = pw @ x
    return streaming.to_output(out, ref)
