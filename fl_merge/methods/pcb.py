"""PCB-Merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model
Merging"): intra- and inter-balancing scores, keep each task's top ratio of them, and a
score-weighted mean of the (outlier-clipped) task vectors. Whole-vector: the clipping, the
normalisations and the top-ratio cut run over each client's whole flattened vector, but only
through four numbers per client (its two clip bounds, its score's top-ratio cut and largest
score). `pcb_pass` finds them exactly by streamed radix selects (`streaming.order_stats`),
so PCB is a declared pass (fl_merge/merging/passes.py): given them, every [K, n] block of
whole tensors is merged alone, and a large-model round or `fl-merge merge` on files merges
it group by group, tensor by tensor, exactly as whole."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging import streaming
from fl_merge.merging.blocks import task_vectors_dtype
from fl_merge.merging.registry import Paper, number_param, register

# The authors' code clips |tau_i| at these fractions from either end of its sorted entries.
CLIP = 0.0001


def _check_ratio(params: dict) -> None:
    r = number_param(params, "ratio")
    if not 0.0 < r <= 1.0:
        raise MergeInputError(f"ratio must lie in (0, 1], got {params['ratio']}")


def _positions(n: int, ratio: float) -> tuple[int, int, int]:
    """0-based positions, in a client's ascending order of P = n entries, of the authors'
    clip bounds of |tau_i| (floor(P 1e-4), floor(P (1 - 1e-4) - 1)) and score cut
    (floor(P (1 - ratio)))."""
    return int(n * CLIP), int(n * (1 - CLIP) - 1), int(n * (1.0 - ratio))


class _Range(NamedTuple):
    """Per client i (rows [K, 1], float64): the least value lo_i and the largest hi_i of a
    row, span_i = hi_i - lo_i where positive (1 elsewhere), and the rows whose span is 0."""
    lo: torch.Tensor
    hi: torch.Tensor
    span: torch.Tensor
    flat: list[int]


def _range(lo: Sequence[float], hi: Sequence[float], device: torch.device) -> _Range:
    lo_t, hi_t = (torch.tensor(v, dtype=torch.float64, device=device).reshape(-1, 1) for v in (lo, hi))
    span = hi_t - lo_t
    return _Range(lo_t, hi_t, torch.where(span > 0, span, 1.0),
                  [i for i, d in enumerate(span.reshape(-1).tolist()) if not d > 0])


def _minmax(x: torch.Tensor, r: _Range, inplace: bool = False) -> torch.Tensor:
    """(x - lo_i) / span_i per row i (in x when `inplace`, else a new tensor), 0 on a row
    whose span is 0 (a constant row: the authors' code gives NaN)."""
    out = (x.sub_(r.lo) if inplace else x.sub(r.lo)).div_(r.span)
    if r.flat:
        out[r.flat] = 0.0
    return out


def _scores(x: torch.Tensor, clip: _Range) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of `pcb` on one float64 block x[K, n] (overwritten) of whole tensors, given
    each client's clip bounds (entries of its |tau_i|, so the clipped row's min and max):
    ``(b, c)``, the scores b_i = exp(K (minmax(|c_i|)^2 - 1)) tanh(tau_i sum_j tau_j) and
    the clipped c_i. Elementwise given the bounds, so a block gives the same bits wherever
    it is merged (whole, in a group, from files)."""
    k = x.shape[0]
    total = x[0].clone()
    for row in x[1:]:
        total.add_(row)
    a = x.abs().clamp_(clip.lo, clip.hi)
    b = _minmax(a, clip)
    b = b.square_().sub_(1.0).mul_(k).exp_()  # intra-balancing
    c = a.copysign_(x).masked_fill_(x == 0, 0.0)  # sign(tau_i) |c_i|, without a sign temporary
    b.mul_(x.mul_(total).tanh_())  # inter-balancing
    return b, c


def _blocks(task_vectors, device: torch.device):
    """The float64 [K, n] blocks PCB computes on: a few such temporaries are alive at once
    (`_scores`), so a block is an eighth of streaming's usual size (kept in cache)."""
    k = len(task_vectors)
    return streaming.iter_blocks(task_vectors, device, torch.float64,
                                 block=streaming.block_numel(8 * k, device))


def pcb_pass(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
             device: torch.device, params: dict) -> dict:
    """PCB's global statistics (its declared pass, fl_merge/merging/passes.py), per client,
    exact and streamed (nothing model-sized is flattened): ``clip`` [lo_i, hi_i], the
    order statistics of |tau_i| at the authors' clip positions (`streaming.abs_order_stats`,
    two passes); ``cut`` and ``top``, the order statistic of the scores b_i at floor(P (1 -
    ratio)) and their largest (`streaming.order_stats` on b_i computed block by block from
    the clip bounds, two more passes). The clipped row's min and max are lo_i and hi_i (they
    are its entries), and the cut row's are cut_i and top_i: these are all step 2's and
    step 4's min-max normalisations read."""
    k = len(task_vectors)
    n = sum(v.numel() for v in task_vectors[0].values())
    if n == 0:
        return {"clip": [[0.0, 0.0]] * k, "cut": [0.0] * k, "top": [0.0] * k}
    lo_at, hi_at, cut_at = _positions(n, float(params["ratio"]))
    clip = streaming.abs_order_stats(task_vectors, [[lo_at + 1, hi_at + 1]] * k, device,
                                     task_vectors_dtype(task_vectors))
    bounds = _range([c[0] for c in clip], [c[1] for c in clip], device)

    def scores() -> Iterator[torch.Tensor]:
        return (_scores(x, bounds)[0] for _, _, _, x, _ in _blocks(task_vectors, device))

    cuts = streaming.order_stats(scores, k, [[cut_at + 1, n]] * k, device)
    return {"clip": clip, "cut": [c[0] for c in cuts], "top": [c[1] for c in cuts]}


def _check_stats(stats: Mapping, k: int) -> None:
    if any(len(stats.get(name, ())) != k for name in ("clip", "cut", "top")):
        raise MergeInputError(f"pcb stats must hold 'clip', 'cut' and 'top' for each of the {k} "
                              "clients (pcb_pass on the same task vectors)")


@register(
    "pcb", coordinatewise=False, check_params=_check_ratio, lambda_scale="delta",
    global_pass=pcb_pass,  # clip bounds, score cut and max: a large-model round merges by groups
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
    stats: Mapping | None = None,
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
    Memory: one [K, n] float64 block (and a few like it) at a time besides the result, the
    radix selects' K x 2^16 counts and candidate values (`pcb_pass`); never a flattened
    vector (stacking the K rows, as the authors' code does, measured 90x Task Arithmetic's
    memory for K=8 MiniLM-L6 vectors; benchmarks/aggregation.py).

    stats (`pcb_pass` on the whole task vectors, given as ``merge(..., stats=...)``): these
    task vectors may be any subset of the whole one's tensors, merged exactly as in the
    whole merge; without it the pass runs on these task vectors first (the whole merge).
    Per block, given the statistics, steps 1-5 are elementwise: the whole merge and a
    group's see the same blocks (streaming.iter_blocks cuts a tensor alike in either) and
    give the same bits.
    """
    ref = task_vectors[0]
    k = len(task_vectors)
    if stats is None:
        stats = pcb_pass(task_vectors, weights, device, {"ratio": ratio})
    _check_stats(stats, k)
    bounds = _range([c[0] for c in stats["clip"]], [c[1] for c in stats["clip"]], device)
    cut = _range(stats["cut"], stats["top"], device)
    w = weights.to(device=device, dtype=torch.float64).reshape(-1, 1)
    out = {key: torch.empty(r.numel(), dtype=r.dtype) for key, r in ref.items()}
    for key, s, e, x, _ in _blocks(task_vectors, device):
        b, clipped = _scores(x, bounds)
        b = _minmax(b.clamp_(min=cut.lo), cut, inplace=True).mul_(w)  # drop under the top ratio, min-max
        den, num = b[0].clone(), b[0] * clipped[0]
        for i in range(1, k):
            den.add_(b[i])
            num.add_(b[i] * clipped[i])
        out[key][s:e].copy_(torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0))
        del b, clipped, den, num  # not held while the next block is computed
    return {key: v.reshape(ref[key].shape) for key, v in out.items()}
