"""PCB-Merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model
Merging"): intra- and inter-balancing scores, keep each task's top ratio of them, and a
score-weighted mean of the (outlier-clipped) task vectors. Whole-vector: the clipping, the
normalisations and the top-ratio cut run over each client's whole flattened vector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging.registry import Paper, number_param, register

# The authors' code clips |tau_i| at these fractions from either end of its sorted entries.
CLIP = 0.0001


def _check_ratio(params: dict) -> None:
    r = number_param(params, "ratio")
    if not 0.0 < r <= 1.0:
        raise MergeInputError(f"ratio must lie in (0, 1], got {params['ratio']}")


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over one client's vector; 0 when it is constant (the authors'
    code gives NaN)."""
    lo = x.amin()
    span = x.amax() - lo
    return (x - lo) / span if span > 0 else torch.zeros_like(x)


def _sorted_at(x: torch.Tensor, index: int) -> torch.Tensor:
    """The entry at position `index` of x's ascending order (a 0-d tensor)."""
    return torch.kthvalue(x, index + 1).values


@register(
    "pcb", coordinatewise=False, check_params=_check_ratio, lambda_scale="delta",
    space={"ratio": (0.05, 0.1, 0.2)},
    formula="c_i = tau_i with abs clipped to its 0.01% / 99.99% order stats; b_i = "
            "exp(K minmax(abs c_i)^2) tanh(tau_i sum_j tau_j); s_i = minmax(max(b_i, its "
            "top-ratio cut)); sum_i p_i s_i c_i / sum_i p_i s_i (authors' code)",
    paper=Paper("Du et al., NeurIPS 2024, \"Parameter Competition Balancing for Model Merging\"",
                code="duguodong7/pcb-merging, pcb-merging.py (PCB_merge)"),
)
def pcb(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    ratio: float = 0.1,
) -> StateDict:
    """PCB-Merging (Du et al., NeurIPS 2024) as its authors' code computes it (PCB_merge in
    duguodong7/pcb-merging), over each client's whole flattened vector tau_i (P entries):

    1. clip: |tau_i| clamped to its sorted entries at positions floor(P * 1e-4) and
       floor(P (1 - 1e-4) - 1) (the code's outlier clipping; for P < 10^4 it caps the
       largest entry at the second largest), c_i = sign(tau_i) * clamped;
    2. intra-balancing: exp(K * minmax_i(|c_i|)^2), minmax over client i's P entries (the
       paper's Softmax(N Norm(tau_i * tau_i)); the code squares the normalised magnitude,
       and the softmax's denominator is one positive constant per client, which step 4's
       min-max cancels);
    3. inter-balancing: tanh(tau_i * sum_j tau_j) per coordinate (the code's form of the
       paper's similarity to the other tasks), b_i = intra * inter;
    4. drop and rescale: b_i clamped from below at its sorted entry floor(P (1 - ratio))
       (everything under the top ratio becomes that value), then min-max normalised: s_i in
       [0, 1], 0 outside client i's top ratio;
    5. Delta = sum_i p_i s_i c_i / sum_i p_i s_i, 0 where every s_i is 0.

    Scaling (lambda_scale "delta"): Delta is a weighted mean of the clients' clipped vectors,
    and the paper's lambda multiplies it (theta = theta0 + lambda Delta, lambda near 1 in
    the authors' script), so eta = lambda.

    Differences from the authors' code (ours): weights p scale each client's score in the
    mean of step 5 (uniform p is the code); the scores stay unweighted, each task one vote.
    exp(K m^2) is computed as exp(K (m^2 - 1)), the same up to a positive constant per
    client that step 4 cancels, so K > 88 does not overflow; the code's NaN on a constant
    row (0/0 in min-max) is 0 here, and where the code divides by max(sum_i s_i, 1e-12)
    this divides by sum_i p_i s_i when positive and gives 0 otherwise. The paper's
    per-task lambdas found by evolutionary search are not searched: one lambda, on top.
    Memory: one client at a time. Every step above but sum_j tau_j and step 5's sums is
    per client (its order statistics and min-max are over its own row), so this makes one
    pass for sum_j tau_j and one per client, holding a few P-sized float64 vectors: ~8 P x
    8 bytes at peak, never K x P (stacking the K rows, as the authors' code does, measured
    90x Task Arithmetic's memory for K=8 MiniLM-L6 vectors; benchmarks/aggregation.py).
    """
    ref = task_vectors[0]
    k = len(task_vectors)
    sizes = [r.numel() for r in ref.values()]
    n = sum(sizes)
    if n == 0:
        return {key: torch.empty_like(r, device="cpu") for key, r in ref.items()}

    def row(tv) -> torch.Tensor:
        return torch.cat([tv[key].reshape(-1).to(device=device, dtype=torch.float64)
                          for key in ref])

    total = torch.zeros(n, dtype=torch.float64, device=device)
    for tv in task_vectors:
        total.add_(row(tv))
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for tv, w in zip(task_vectors, weights.tolist()):
        x = row(tv)
        a = x.abs()
        a = a.clamp_(_sorted_at(a, int(n * CLIP)), _sorted_at(a, int(n * (1 - CLIP) - 1)))
        score = torch.exp(k * (_minmax(a).square_() - 1.0))  # intra-balancing
        score.mul_(torch.tanh(x * total))  # inter-balancing
        clipped = a.mul_(torch.sign(x))
        del x
        score = score.clamp_(min=_sorted_at(score, int(n * (1.0 - ratio))))
        s = _minmax(score).mul_(w)
        del score
        den.add_(s)
        num.add_(s.mul_(clipped))
        del s, clipped
    merged = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    out, start = {}, 0
    for (key, r), size in zip(ref.items(), sizes):
        out[key] = merged[start:start + size].reshape(r.shape).to(device="cpu", dtype=r.dtype)
        start += size
    return out
