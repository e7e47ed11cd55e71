"""Interference-reducing merges from the model-merging literature: TIES, DARE and Model
Breadcrumbs. Each sparsifies the task vectors before averaging.

Global top-k (TIES) needs the k-th largest |value| of each client's *whole* task vector: it
is found exactly by a streamed two-pass radix select (`streaming.abs_order_stats`: histogram
of the float bit patterns, then kthvalue inside one bucket), so nothing model-sized is
flattened; the merge itself streams over ``[K, n]`` blocks. Only DARE-TIES, whose random
masks are drawn per whole tensor, flattens one client's (masked) vector at a time
(`streaming.kth_largest_abs`, memory ~2P values, independent of K).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

import torch

from fl_merge.merging import streaming
from fl_merge.merging.registry import is_integer, number_param, register
from fl_merge.core.task_vectors import MergeInputError, StateDict


def _dtype(task_vectors) -> torch.dtype:
    return streaming.work_dtype(next(iter(task_vectors[0].values())).dtype)


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


def ties_merge(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device,
    density: float,
    transform: Callable[[int, str, torch.Tensor], torch.Tensor] | None = None,
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
    reference's result (it then keeps the negative entries)."""
    ref = task_vectors[0]
    dtype = _dtype(task_vectors)
    total = sum(v.numel() for v in ref.values())
    if total == 0:  # only zero-size tensors: nothing to trim or merge
        return {key: torch.empty_like(r, device="cpu") for key, r in ref.items()}
    count = _top_count(total, density)
    if transform is None:
        ranks = [[total - count + 1]] * len(task_vectors)
        thr_list = [r[0] for r in streaming.abs_order_stats(task_vectors, ranks, device, dtype)]
    else:
        thr_list = [
            streaming.kth_largest_abs(tv, count, device, dtype, lambda key, x, i=i: transform(i, key, x))
            for i, tv in enumerate(task_vectors)
        ]
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

    balance, tied = run(list(ref), 0.0)
    majority = float((balance > 0) - (balance < 0))
    if tied and majority != 0:
        run([key for key in ref if key in tied], majority)
    return streaming.to_output(out, ref)


def _check_density(params: dict) -> None:
    d = number_param(params, "density")
    if not 0.0 < d <= 1.0:
        raise MergeInputError(f"density must lie in (0, 1], got {params['density']}")


@register("ties", coordinatewise=False, check_params=_check_density, lambda_scale="delta")
def ties(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    density: float = 0.2,
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
    """
    return ties_merge(task_vectors, weights, device, density)


def dare_seed(seed: int, client: str, key: str) -> int:
    """The seed of one DARE mask, from the run's seed, the client's name and the tensor's
    name: a stable hash (BLAKE2b, the same in every process, unlike Python's hash), so a
    client's mask does not depend on where it sits in the list."""
    msg = "\x1f".join((str(int(seed)), client, key)).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") % (2**63)


def _check_dare(params: dict) -> None:
    r = number_param(params, "drop_rate")
    if not 0.0 <= r < 1.0:
        raise MergeInputError(f"drop_rate must lie in [0, 1), got {params['drop_rate']}")
    if not isinstance(params["base"], str) or params["base"] not in ("fedavg", "ties"):
        raise MergeInputError(f"base must be 'fedavg' or 'ties', got {params['base']!r}")
    _check_density(params)
    if not is_integer(params["seed"]):
        raise MergeInputError(f"seed must be an integer, got {params['seed']!r}")


@register("dare", coordinatewise=False, check_params=_check_dare,
          lambda_scale=lambda params: "delta" if params.get("base") == "ties" else "sum")
def dare(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    names: Sequence[str] | None = None,
    device: torch.device = torch.device("cpu"),
    drop_rate: float = 0.9,
    seed: int = 0,
    base: str = "fedavg",
    density: float = 1.0,
) -> StateDict:
    """DARE, Drop And REscale (Yu et al., ICML 2024, "Language Models are Super Mario"):
    hat tau_i = m_i * tau_i / (1 - drop_rate), m_i ~ Bernoulli(1 - drop_rate) per entry,
    then base="fedavg": Delta = sum_i p_i hat tau_i (unbiased: E[Delta] = fedavg), or
    base="ties": TIES(hat tau, density) (DARE-TIES; density 1 = sign election and
    disjoint mean without further trimming).

    Masks come from a CPU generator seeded by (seed, client name, tensor name)
    (`dare_seed`): a client keeps its mask wherever it sits in the list, so the result does
    not depend on client order, and a given seed gives the same masks on every device and
    in every call. Names must be unique and stable across runs (a task or partition, not a
    node id that changes every run). Without `names` (merge(..., names=None)) a client is
    named by its position, "client <i>", so reordering clients then changes the masks.
    """
    ref = task_vectors[0]
    keys = list(ref)
    dtype = _dtype(task_vectors)
    keep_p = 1.0 - float(drop_rate)
    names = [f"client {i}" for i in range(len(task_vectors))] if names is None else list(names)
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise MergeInputError(f"dare keys its random masks by client name: names must be unique, "
                              f"got {dup!r} twice")

    def transform(i: int, key: str, x: torch.Tensor) -> torch.Tensor:
        if drop_rate == 0:
            return x
        g = torch.Generator().manual_seed(dare_seed(seed, names[i], key))
        keep = torch.rand(x.numel(), generator=g) < keep_p
        return x * keep.to(x.device).reshape(x.shape) / keep_p

    if base == "ties":
        return ties_merge(task_vectors, weights, device, density, transform)
    p = weights.tolist()
    out = {}
    for key in keys:
        acc = torch.zeros(ref[key].numel(), dtype=dtype, device=device)
        for i, tv in enumerate(task_vectors):
            acc.add_(transform(i, key, tv[key].reshape(-1).to(device=device, dtype=dtype)), alpha=p[i])
        out[key] = acc
    return streaming.to_output(out, ref)


def _check_breadcrumbs(params: dict) -> None:
    b, g = number_param(params, "beta"), number_param(params, "gamma")
    if not (0.0 <= b < 1.0 and 0.0 <= g < 1.0 and b + g < 1.0):
        raise MergeInputError(
            f"beta and gamma must lie in [0, 1) with beta + gamma < 1, got beta={b}, gamma={g}"
        )


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


@register("breadcrumbs", coordinatewise=False, check_params=_check_breadcrumbs)
def breadcrumbs(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    beta: float = 0.01,
    gamma: float = 0.85,
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
    """
    ref = task_vectors[0]
    dtype = _dtype(task_vectors)
    k = len(task_vectors)
    pw = weights.to(device=device, dtype=dtype)
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
