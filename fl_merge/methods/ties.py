"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge; its block
machinery (`ties_block`, `ties_merge`) is DARE-TIES's too (fl_merge/methods/dare.py).

Global top-k needs the k-th largest |value| of each client's *whole* task vector: it is
found exactly by a streamed two-pass radix select (`streaming.abs_order_stats`: histogram
of the float bit patterns, then kthvalue inside one bucket), so nothing model-sized is
flattened; the merge itself streams over ``[K, n]`` blocks. Only DARE-TIES, whose random
masks are drawn per whole tensor, flattens one client's (masked) vector at a time
(`streaming.kth_largest_abs`, memory ~2P values, independent of K).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging import conventions, streaming
from fl_merge.merging.blocks import task_vectors_dtype
from fl_merge.merging.registry import Paper, number_param, register


def ties_block(
    x: torch.Tensor, thresholds: torch.Tensor, weights: torch.Tensor, tie_sign: float = 0.0
) -> tuple[torch.Tensor, int, bool]:
    """TIES on one block x[K, n] (overwritten): trim |x_i| < thresholds_i to 0, elect
    s = sign(sum_i p_i x_i), use `tie_sign` where that sum is exactly 0, and return
    ``(delta, balance, live_ties)``: delta the p-weighted mean over the clients whose trimmed
    entry agrees with s (0 where none does), balance = #(s > 0) - #(s < 0) of the elected
    signs before tie-breaking, live_ties whether some tied coordinate has a nonzero entry
    (so that `tie_sign` decides it).

    Agreement follows the TIES reference code (prateeky2806/ties-merging,
    src/utils/merge_utils.py, disjoint_merge): entries with x > 0 where s > 0, else entries
    with x < 0, so a sign s = 0 selects the negative entries."""
    x.mul_(x.abs() >= thresholds.reshape(-1, 1))
    w = weights.reshape(-1, 1)
    elected = torch.sign(w.T @ x).reshape(-1)  # [n]
    tied = elected == 0
    balance = int((elected > 0).sum()) - int((elected < 0).sum())
    live_ties = bool((tied & (x != 0).any(0)).any())
    if tie_sign != 0:
        elected = torch.where(tied, torch.full_like(elected, tie_sign), elected)
    agree = torch.where(elected > 0, x > 0, x < 0)
    wa = agree.to(x.dtype).mul_(w)  # [K, n]: p_i where client i agrees
    num = (wa * x).sum(0)
    den = wa.sum(0)
    delta = torch.where(den > 0, num / den.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    return delta, balance, live_ties


def _top_count(total: int, density: float) -> int:
    return max(1, int(density * total))


def _thresholds(task_vectors, device, dtype, density: float, transform=None) -> list[float]:
    """Each client's k-th largest |tau_i| over its whole task vector (k = _top_count)."""
    total = sum(v.numel() for v in task_vectors[0].values())
    count = _top_count(total, density)
    if transform is None:
        ranks = [[total - count + 1]] * len(task_vectors)
        return [r[0] for r in streaming.abs_order_stats(task_vectors, ranks, device, dtype)]
    return [streaming.kth_largest_abs(tv, count, device, dtype, lambda key, x, i=i: transform(i, key, x))
            for i, tv in enumerate(task_vectors)]


def ties_pass(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
              device: torch.device, params: dict) -> dict | None:
    """TIES's global statistics (its declared pass, fl_merge/merging/passes.py), streamed:
    ``thresholds`` (each client's k-th largest |tau_i| over the whole vector: two radix
    passes) and ``tie_sign`` (the majority of the elected signs over the whole vector, the
    sign an exact-0 sum takes: one more pass over [K, n] blocks). None for
    convention=mergekit (per tensor already)."""
    if params["convention"] == "mergekit":
        return None
    dtype = task_vectors_dtype(task_vectors)
    if sum(v.numel() for v in task_vectors[0].values()) == 0:
        return {"thresholds": [0.0] * len(task_vectors), "tie_sign": 0.0}
    thr_list = _thresholds(task_vectors, device, dtype, float(params["density"]))
    thr = torch.tensor(thr_list, dtype=dtype, device=device)
    pw = weights.to(device=device, dtype=dtype)
    balance = 0
    for _, _, _, x, _ in streaming.iter_blocks(task_vectors, device, dtype):
        balance += ties_block(x, thr, pw)[1]
    return {"thresholds": thr_list, "tie_sign": float((balance > 0) - (balance < 0))}


def ties_transform_pass(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
                        device: torch.device, density: float,
                        transform: Callable[[int, str, torch.Tensor], torch.Tensor]) -> dict:
    """`ties_pass`'s statistics of the transformed task vectors (DARE-TIES: each client's
    tensor rewritten by `transform(client, key, flat_tensor)`, a function of the whole
    tensor), streamed over the K clients' transformed tensors of one name at a time (memory
    K x the largest tensor, as `ties_merge` with a transform): the thresholds by
    `streaming.order_stats` (exact), the tie sign by one more pass."""
    total = sum(v.numel() for v in task_vectors[0].values())
    k = len(task_vectors)
    if total == 0:
        return {"thresholds": [0.0] * k, "tie_sign": 0.0}
    dtype = task_vectors_dtype(task_vectors)

    def blocks():
        for key in task_vectors[0]:
            if task_vectors[0][key].numel():
                yield torch.stack([transform(i, key, tv[key].reshape(-1).to(device=device, dtype=dtype))
                                   for i, tv in enumerate(task_vectors)])

    rank = total - _top_count(total, density) + 1
    thr_list = [r[0] for r in streaming.order_stats(lambda: (x.abs_() for x in blocks()), k,
                                                    [[rank]] * k, device, signed=False)]
    thr = torch.tensor(thr_list, dtype=dtype, device=device)
    pw = weights.to(device=device, dtype=dtype)
    balance = sum(ties_block(x, thr, pw)[1] for x in blocks())
    return {"thresholds": thr_list, "tie_sign": float((balance > 0) - (balance < 0))}


def ties_merge(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device,
    density: float,
    transform: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
    stats: Mapping | None = None,
) -> StateDict:
    """TIES over whole task vectors; `transform(client, key, flat_tensor)` optionally rewrites
    each client's tensor first (DARE). Without a transform the merge streams [K, n] blocks;
    with one it stacks whole tensors (memory K x largest tensor) so each random mask is
    generated once per (client, tensor), independent of the block size.

    Tie-breaking as in the TIES reference code: where the elected sum is exactly 0 the sign
    is the majority sign of all elected signs over the whole flattened update (`tie_sign`
    = sign of the summed balance; the reference's resolve_zero_signs). That sign is known
    only after a full pass, so the pass runs with tie_sign 0 and the tensors holding a tie
    decided by a nonzero entry are merged again with the majority sign (rare: the sum must
    cancel exactly); when the majority sign is itself 0 the first pass is already the
    reference's result (it then keeps the negative entries).

    stats (`ties_pass` on the whole task vectors, or `ties_transform_pass` with the same
    transform): the thresholds and the tie sign are taken from it, and these task vectors
    (any subset of the whole one's tensors) are merged in one pass with that sign: exactly
    those tensors of the whole merge (a tensor without a live tie is the same under either
    sign)."""
    ref = task_vectors[0]
    dtype = task_vectors_dtype(task_vectors)
    total = sum(v.numel() for v in ref.values())
    if total == 0:  # only zero-size tensors: nothing to trim or merge
        return {key: torch.empty_like(r, device="cpu") for key, r in ref.items()}
    if stats is not None:
        thr_list, first_sign = stats["thresholds"], float(stats["tie_sign"])
    else:
        thr_list, first_sign = _thresholds(task_vectors, device, dtype, density, transform), 0.0
    thr = torch.tensor(thr_list, dtype=dtype, device=device)
    pw = weights.to(device=device, dtype=dtype)
    out = streaming.empty_like_flat(ref, device, dtype)

    def run(keys, tie_sign: float) -> tuple[int, set]:
        balance, tied = 0, set()
        if transform is None:
            blocks = ((key, s, e, x) for key, s, e, x, _ in
                      streaming.iter_blocks(task_vectors, device, dtype, keys=keys))
        else:
            blocks = ((key, 0, ref[key].numel(), torch.stack([
                transform(i, key, tv[key].reshape(-1).to(device=device, dtype=dtype))
                for i, tv in enumerate(task_vectors)])) for key in keys)
        for key, s, e, x in blocks:
            out[key][s:e], b, live = ties_block(x, thr, pw, tie_sign)
            balance += b
            if live:
                tied.add(key)
        return balance, tied

    balance, tied = run(list(ref), first_sign)
    majority = float((balance > 0) - (balance < 0))
    if stats is None and tied and majority != 0:
        run([key for key in ref if key in tied], majority)
    return streaming.to_output(out, ref)


def ties_mergekit(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device,
    density: float,
    transform: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
) -> StateDict:
    """TIES by mergekit's rules (`fl_merge.merging.conventions`), tensor by tensor as
    mergekit runs it: each client's tensor (after `transform`, DARE's masks) keeps exactly
    its top k = max(1, floor(density n)) entries (`conventions.topk_mask`), then
    `conventions.disjoint_mean` (an exact-0 sum elects +), block by block. Memory per
    tensor: the K clients' tensors in the work dtype (views of the inputs when they already
    are), K boolean masks, one sort (float32 magnitudes and int64 order) per worker thread
    (`conventions.topk_masks`: the K sorts run torch.get_num_threads() at a time), and
    [K, block] buffers."""
    ref = task_vectors[0]
    dtype = task_vectors_dtype(task_vectors)
    pw = weights.to(device=device, dtype=dtype)
    out = {}
    for key in ref:
        rows = []
        for i, tv in enumerate(task_vectors):
            x = tv[key].reshape(-1).to(device=device, dtype=dtype)
            rows.append(x if transform is None else transform(i, key, x))
        masks = conventions.topk_masks(rows, density)
        out[key] = conventions.disjoint_mean(rows, pw, masks)
        del rows, masks
    return streaming.to_output(out, ref)


def check_density(params: dict) -> None:
    d = number_param(params, "density")
    if not 0.0 < d <= 1.0:
        raise MergeInputError(f"density must lie in (0, 1], got {params['density']}")


def _check_ties(params: dict) -> None:
    check_density(params)
    conventions.check_convention(params)


@register(
    "ties", coordinatewise=False, check_params=_check_ties, lambda_scale="delta",
    space={"density": (0.1, 0.2, 0.3)},
    # mergekit's TIES trims each tensor alone: per tensor is then the method itself
    per_tensor_exact=lambda params: params["convention"] == "mergekit",
    global_pass=ties_pass,  # thresholds + tie sign: a large-model round merges it by groups
    formula="keep each client's top density fraction of abs(tau_i), elect the sign by mass (an "
            "exact 0 takes the majority of the elected signs), mean over the agreeing clients; "
            "convention=mergekit: per tensor, exactly k kept, an exact 0 elects +",
    paper=Paper("Yadav et al., NeurIPS 2023, \"TIES-Merging: Resolving Interference When "
                "Merging Models\"",
                code="prateeky2806/ties-merging, src/utils/merge_utils.py (sign election, tie-break)"),
)
def ties(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    density: float = 0.2,
    convention: str = "fl-merge",
    stats: Mapping | None = None,
) -> StateDict:
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

    1. trim: per client keep the top k = max(1, floor(density * P)) entries of |tau_i| over
       the whole flattened vector (all tensors; entries tied with the k-th largest are kept
       too), zero the rest -> hat tau_i;
    2. elect: s = sign(sum_i p_i hat tau_i) per coordinate (the paper's mass vote; uniform p
       gives the same sign); where the sum is exactly 0, s is the majority of the elected
       signs over the whole vector, as in the TIES reference code (resolve_zero_signs in
       prateeky2806/ties-merging; with no majority its disjoint_merge keeps the negative
       entries, and so does this);
    3. disjoint mean: Delta = sum_{i in A} p_i hat tau_i / sum_{i in A} p_i over
       A = {i : sign(hat tau_i) = s, hat tau_i != 0}, 0 where A is empty (the reference's
       mean over the nonzero selected entries; uniform p gives the same).

    Mean-convention scaling: the disjoint mean already *is* a mean over the agreeing
    clients, so Delta is used as is (no factor K): identical clients give back their common
    vector (at density 1), and eta plays exactly the paper's lambda (theta = theta0 +
    lambda * tau_m). Unlike fedavg's mean it is not diluted by clients that are silent on a
    coordinate, which is the point of the disjoint merge.
    Memory: one [K, n] block at a time, K x 32768 histogram counts and the candidate values
    of one radix bucket per client; nothing model-sized besides the result.

    Against the authors' code (prateeky2806/ties-merging, merge_utils.py topk_values_mask):
    it keeps the entries >= the (P - floor(density P))-th smallest |tau_i|, i.e.
    floor(density P) + 1 of them; we keep the paper's top density fraction, floor(density P)
    (one entry fewer per client; mergekit's count is ours).

    convention="mergekit" (mergekit 0.1.5's "ties": merge_methods/
    generalized_task_arithmetic.py, sparsify.magnitude) differs in four rules, each an
    edge case of the same method (fl_merge/merging/conventions.py; test:
    tests/methods/test_mergekit_parity.py, bit-identical files):
    a. scope: each tensor is trimmed alone (per_tensor_exact then holds, so `fl-merge merge`
       is this method exactly); ours ranks the whole task vector;
    b. trim ties: exactly k entries per tensor, those first in torch.argsort(|tau_i|,
       descending=True); ours keeps every entry tied with the k-th largest (the authors'
       >= kthvalue), which differs mostly on fp16/bf16 checkpoints, whose task vectors
       repeat values;
    c. sign ties: where sum_i p_i hat tau_i is exactly 0 the elected sign is + (mergekit's
       ``sum >= 0``); ours takes the majority of the elected signs (authors' code);
    d. arithmetic: the vote sums the products p_i hat tau_i row by row (a sum that rounds to
       0 or flips sign can elect differently from our matrix-vector product).
    mergekit's weights are our p_i up to a common factor (its normalize: true divides by
    the agreeing weights, as our mean does; its lambda is our eta). Without ``dtype:
    float32`` mergekit computes in the checkpoint's dtype (fp16 arithmetic); we always
    compute in float32 at least.
    """
    if convention == "mergekit":
        return ties_mergekit(task_vectors, weights, device, density)
    return ties_merge(task_vectors, weights, device, density, stats=stats)

