"""Streaming helpers shared by the merge methods (private).

Everything here bounds memory by one *block* of K client rows (``[K, n]`` with n at most
`block_numel(K, device)`), never K copies of the model. Blocks are views of one reusable
buffer: a yielded block is only valid until the next one is produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

# Elements per block over all K rows. 2**20 float32 = 4 MiB on CPU: the block stays in cache
# between the gather copy and the method's arithmetic (measured on a 2-core EPYC, see
# benchmarks/aggregation.py). GPUs want large launches, so blocks are much bigger there.
CPU_BLOCK = 1 << 20
CUDA_BLOCK = 1 << 26
MIN_ROW = 1 << 14


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_numel(k: int, device: torch.device) -> int:
    """Coordinates per block row for K clients on `device`."""
    total = CUDA_BLOCK if device.type == "cuda" else CPU_BLOCK
    return max(MIN_ROW, total // max(k, 1))


def iter_blocks(
    rows: Sequence[Mapping[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    keys: Sequence[str] | None = None,
    block: int | None = None,
    extra_rows: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None,
) -> Iterator[tuple[str, int, int, torch.Tensor, dict[str, torch.Tensor]]]:
    """Yield ``(key, start, end, stacked[K, end-start], extras)`` over the flattened tensors.

    `stacked[i]` holds client i's coordinates start:end of tensor `key` (flattened), cast to
    `dtype` on `device`. `extra_rows` (name -> one dict per client) are gathered alike into
    `extras[name]`. Buffers are reused: consume a block before asking for the next.
    """
    k = len(rows)
    keys = list(rows[0].keys()) if keys is None else list(keys)
    extra_rows = dict(extra_rows or {})
    if block is None:
        block = block_numel(k * (1 + len(extra_rows)), device)
    largest = max((rows[0][key].numel() for key in keys), default=0)
    row = max(1, min(block, largest))  # zero-size tensors yield no blocks
    buf = torch.empty(k * row, dtype=dtype, device=device)
    ebufs = {n: torch.empty(k * row, dtype=dtype, device=device) for n in extra_rows}
    for key in keys:
        flats = [tv[key].reshape(-1) for tv in rows]
        eflats = {n: [e[key].reshape(-1) for e in ex] for n, ex in extra_rows.items()}
        numel = flats[0].numel()
        for s in range(0, numel, row):
            e = min(numel, s + row)
            n = e - s
            stacked = buf[: k * n].view(k, n)
            for i in range(k):
                stacked[i].copy_(flats[i][s:e])
            ext = {}
            for name, fl in eflats.items():
                ext[name] = ebufs[name][: k * n].view(k, n)
                for i in range(k):
                    ext[name][i].copy_(fl[i][s:e])
            yield key, s, e, stacked, ext


def empty_like_flat(ref: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """One flat zero-initialised tensor per key, on `device` in `dtype`."""
    return {key: torch.zeros(v.numel(), dtype=dtype, device=device) for key, v in ref.items()}


def to_output(flat: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]):
    """Reshape flat per-key results to the reference shapes, on CPU in the reference dtype."""
    return {
        key: flat[key].reshape(ref[key].shape).to(device="cpu", dtype=ref[key].dtype)
        for key in ref
    }


# --------------------------------------------------------------------------------------
# Sorting networks: for small K a coordinate-wise sort of a [K, n] block is fastest as a
# fixed sequence of elementwise min/max pairs (fully vectorised, no per-column work).


def batcher_network(n: int) -> list[tuple[int, int]]:
    """Comparators (i, j), i < j, of Batcher's merge-exchange sort for any n
    (Knuth TAOCP vol. 3, 5.2.2 Algorithm M). After applying them in order, wire i holds the
    i-th smallest value."""
    if n < 2:
        return []
    t = math.ceil(math.log2(n))
    pairs: list[tuple[int, int]] = []
    p = 1 << (t - 1)
    while p > 0:
        q, r, d = 1 << (t - 1), 0, p
        while True:
            for i in range(n - d):
                if i & p == r:
                    pairs.append((i, i + d))
            if q == p:
                break
            d, q, r = q - p, q >> 1, p
        p >>= 1
    return pairs


def pruned_network(n: int, needed: Sequence[int]) -> list[tuple[int, int]]:
    """Batcher's network without the comparators that cannot influence wires `needed`."""
    live = set(needed)
    keep: list[tuple[int, int]] = []
    for i, j in reversed(batcher_network(n)):
        if i in live or j in live:
            keep.append((i, j))
            live.update((i, j))
    return keep[::-1]


# Above this many clients torch.sort beats the O(K log^2 K) network on CPU.
NETWORK_MAX_K = 32


def sorted_rows(stacked: torch.Tensor, needed: Sequence[int]) -> list[torch.Tensor]:
    """Rows of `stacked` [K, n] sorted along dim 0; only the rows `needed` are guaranteed
    to hold their order statistic. `stacked` is overwritten (it is used as scratch)."""
    k = stacked.shape[0]
    if k > NETWORK_MAX_K or stacked.device.type != "cpu":
        vals = torch.sort(stacked, dim=0).values
        return [vals[i] for i in range(k)]
    rows = [stacked[i] for i in range(k)]
    spare = torch.empty_like(rows[0])
    for i, j in pruned_network(k, needed):
        a, b = rows[i], rows[j]
        torch.minimum(a, b, out=spare)
        torch.maximum(a, b, out=a)
        rows[i], rows[j], spare = spare, a, b
    return rows


# --------------------------------------------------------------------------------------
# Whole-vector reductions, streamed per block with float64 accumulation.


def sq_distances(
    task_vectors: Sequence[Mapping[str, torch.Tensor]], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """[K, K] float64 matrix of squared Euclidean distances between whole task vectors.

    Differences are taken directly per block (no ||a||^2 + ||b||^2 - 2ab cancellation), each
    block's squared distances summed in float64."""
    k = len(task_vectors)
    d2 = torch.zeros(k, k, dtype=torch.float64, device=device)
    for _, _, _, x, _ in iter_blocks(task_vectors, device, dtype):
        for i in range(k - 1):
            diff = x[i + 1 :] - x[i]
            s = torch.linalg.vector_norm(diff, dim=1, dtype=torch.float64).square()
            if not bool(torch.isfinite(s).all()):  # a difference overflowed `dtype`
                diff = x[i + 1 :].double() - x[i].double()
                s = torch.linalg.vector_norm(diff, dim=1).square()
            d2[i, i + 1 :] += s
    d2 = d2 + d2.T
    return d2.cpu()


def sq_norms_to(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    center: Mapping[str, torch.Tensor] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """float64 [K]: ||tau_i - center||^2 over all tensors (center None = zeros). `center`
    holds flat per-key tensors on `device`."""
    k = len(task_vectors)
    out = torch.zeros(k, dtype=torch.float64, device=device)
    for key, s, e, x, _ in iter_blocks(task_vectors, device, dtype):
        if center is not None:
            x.sub_(center[key][s:e])
        out += torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square()
    return out.cpu()


def kth_largest_abs(
    tv: Mapping[str, torch.Tensor],
    count: int,
    device: torch.device,
    dtype: torch.dtype,
    transform=None,
) -> float:
    """The `count`-th largest |value| of one client's whole task vector (exact).

    Memory: one flat copy of this client's vector (P values) plus torch.kthvalue's working
    copy, i.e. ~2P values, independent of K. `transform(key, tensor)` may rewrite each
    tensor first (DARE's rescaled drop)."""
    total = sum(v.numel() for v in tv.values())
    flat = torch.empty(total, dtype=dtype, device=device)
    s = 0
    for key, v in tv.items():
        n = v.numel()
        x = v.reshape(-1).to(device=device, dtype=dtype)
        if transform is not None:
            x = transform(key, x)
        torch.abs(x, out=flat[s : s + n])
        s += n
    return float(torch.kthvalue(flat, total - count + 1).values)


# --------------------------------------------------------------------------------------
# Exact order statistics by a two-pass radix select, streamed over blocks.

_BUCKET_BITS = 15  # buckets 0 .. 2^15 - 1 (|values|: the sign bit excluded)


def _buckets(a: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """Bucket id = top bits of an order-preserving integer key of each value, so that buckets
    are ordered like the values they hold. |values| (signed False): the IEEE pattern of a
    non-negative float (exponent and the leading mantissa bits), whose integer order is the
    float order. signed: the float32 image of the value (rounding to float32 never reverses
    an order), its pattern with the magnitude bits flipped where negative (the usual radix
    key of signed floats), its top 15 bits shifted to 0 .. 2^15 - 1 (1/64 of a binade
    each); -0.0 falls just below +0.0."""
    if signed:
        bits = a.to(torch.float32).view(torch.int32)
        key = (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)  # one int32 temporary
        return key.bitwise_right_shift_(32 - _BUCKET_BITS).add_(1 << (_BUCKET_BITS - 1))
    if a.dtype == torch.float64:
        return a.view(torch.int64) >> (63 - _BUCKET_BITS)
    if a.dtype == torch.float32:
        return a.view(torch.int32) >> (31 - _BUCKET_BITS)
    raise TypeError(f"order statistics need float32 or float64, got {a.dtype}")


def order_stats(
    blocks: Callable[[], Iterable[torch.Tensor]],
    k: int,
    ranks: Sequence[Sequence[int]],
    device: torch.device,
    signed: bool = True,
) -> list[list[float]]:
    """Exact order statistics of K rows of values that arrive as a stream of [K, n] blocks
    (float32 or float64; `blocks()` is called twice and must give the same values, it may
    compute them block by block): ``out[i][j]`` is the ranks[i][j]-th smallest value
    (1-based) of row i. signed False: the values are non-negative (|tau|).

    Two passes: (1) a histogram per row of the values' bucket ids (`_buckets`), which
    locates the bucket holding each wanted rank; (2) the values falling in those buckets,
    from which torch.kthvalue picks the exact one (exact zeros are counted, not kept).
    Memory: one block, K x 2^15 counts and the nonzero candidate values (typically a tiny
    fraction of the row; all of it only if nearly all values share one bucket)."""
    nb = 1 << _BUCKET_BITS
    # int32 like the bucket ids: an int64 offset would promote (and copy) the whole block
    offsets = (torch.arange(k, device=device, dtype=torch.int32) * nb).reshape(k, 1)

    def ids(x: torch.Tensor) -> torch.Tensor:  # row i's bucket b as i * nb + b
        b = _buckets(x, signed)
        return b.add_(offsets) if b.dtype == torch.int32 else b.add_(offsets.long())

    hist = torch.zeros(k * nb, dtype=torch.int64, device=device)
    for x in blocks():
        hist += torch.bincount(ids(x).reshape(-1), minlength=k * nb)
        del x  # not held while the next block is computed
    cum = hist.reshape(k, nb).cumsum_(1).cpu()
    del hist  # (on the CPU, cum is hist itself: freed below, before the second pass)
    total = int(cum[0, -1])
    wanted: dict[int, list[tuple[int, int, int]]] = {}  # bucket id -> (i, j, rank in bucket)
    for i, rs in enumerate(ranks):
        for j, r in enumerate(rs):
            if not 1 <= r <= total:
                raise ValueError(f"rank {r} outside 1..{total}")
            bucket = int(torch.searchsorted(cum[i], r))
            below = int(cum[i, bucket - 1]) if bucket > 0 else 0
            wanted.setdefault(i * nb + bucket, []).append((i, j, r - below))
    del cum
    slot = torch.full((k * nb,), -1, dtype=torch.int32, device=device)  # wanted bucket -> 0..W-1
    slot[list(wanted)] = torch.arange(len(wanted), dtype=torch.int32, device=device)
    # the nonzero values in wanted buckets, block by block, and their bucket ids; exact zeros
    # (a frozen layer's task vector, DARE's dropped entries) only counted per wanted bucket
    vals, where = [], []
    zeros = torch.zeros(len(wanted), dtype=torch.int64, device=device)
    for x in blocks():
        b = ids(x)
        keep = slot[b] >= 0
        zero = keep & (x == 0)
        zeros += torch.bincount(slot[b[zero]], minlength=len(wanted))
        keep.logical_xor_(zero)
        vals.append(x[keep])
        where.append(b[keep])
        del x, b, keep, zero
    cand, at = torch.cat(vals), torch.cat(where)
    del vals, where, slot
    zeros = dict(zip(wanted, zeros.tolist()))
    out = [[0.0] * len(rs) for rs in ranks]
    for bucket, items in wanted.items():
        in_bucket, z = cand[at == bucket], zeros[bucket]
        neg = int((in_bucket < 0).sum())
        for i, j, r in items:  # in order: the negative candidates, z zeros, the positive ones
            out[i][j] = (float(torch.kthvalue(in_bucket, r).values) if r <= neg else 0.0 if r <= neg + z
                         else float(torch.kthvalue(in_bucket, r - z).values))
    return out


def abs_order_stats(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    ranks: Sequence[Sequence[int]],
    device: torch.device,
    dtype: torch.dtype,
    keys: Sequence[str] | None = None,
) -> list[list[float]]:
    """Exact order statistics of |tau_i| over the tensors `keys` of each client i:
    ``out[i][j]`` is the ranks[i][j]-th smallest |value| (1-based) of client i, by
    `order_stats` over the task vectors' [K, n] blocks in `dtype`."""
    def blocks() -> Iterator[torch.Tensor]:
        return (x.abs_() for _, _, _, x, _ in iter_blocks(task_vectors, device, dtype, keys=keys))

    return order_stats(blocks, len(task_vectors), ranks, device, signed=False)


# --------------------------------------------------------------------------------------
# Linear combinations and Gram matrices.


def linear_combination(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    coef: Sequence[float] | torch.Tensor,
    device: torch.device,
    extra: tuple[float, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """sum_i coef_i tau_i (+ a * v for ``extra=(a, v)``, v flat per key on `device`), on CPU
    in the task vectors' dtypes. Streamed per block of each client's flat tensor with fused
    multiply-adds into the output block, which stays in cache across clients: one read of
    every input value, one write of the result, no [K, n] gather."""
    c = [float(x) for x in coef]
    out: dict[str, torch.Tensor] = {}
    row = block_numel(8, device) if device.type == "cpu" else None
    for key, r in task_vectors[0].items():
        work = work_dtype(r.dtype)
        flats = [tv[key].reshape(-1) for tv in task_vectors]
        numel = r.numel()
        step = max(1, row or numel)
        acc = torch.empty(numel, dtype=work, device=device)
        for s in range(0, numel, step):
            e = min(numel, s + step)
            o = acc[s:e]
            torch.mul(flats[0][s:e].to(device=device, dtype=work), c[0], out=o)
            for ci, fl in zip(c[1:], flats[1:]):
                o.add_(fl[s:e].to(device=device, dtype=work), alpha=ci)
            if extra is not None and extra[0] != 0:
                o.add_(extra[1][key][s:e], alpha=float(extra[0]))
        out[key] = acc.reshape(r.shape).to(device="cpu", dtype=r.dtype)
    return out


def gram(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    also: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """float64 Gram matrix G_ij = <tau_i, tau_j> over all tensors, one streamed pass, each
    block's products computed in float64. With `also` (flat per key on `device`, or a
    function ``(key, start, end, block[K, n]) -> row[n]`` computing it block by block, which
    may overwrite the block) it is appended as row/column K: G[K, i] = <also, tau_i>,
    G[K, K] = ||also||^2."""
    k = len(task_vectors) + (also is not None)
    g = torch.zeros(k, k, dtype=torch.float64, device=device)
    for key, s, e, x, _ in iter_blocks(task_vectors, device, dtype):
        xd = x.double()
        if also is not None:
            row = also(key, s, e, x) if callable(also) else also[key][s:e]
            xd = torch.cat([xd, row.double().reshape(1, -1)])
        g += xd @ xd.T
    return g.cpu()


def sq_dist_to_combination(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """||x_i - v||^2 for every row x_i, v = sum_j c_j x_j, from the rows' Gram matrix g
    (float64): G_ii - 2 (G c)_i + c'Gc, clamped at 0. Exact up to float64 cancellation:
    distances below ~1e-7 of the vectors' norms are not resolved."""
    gc = g @ c
    return (torch.diagonal(g) - 2 * gc + c @ gc).clamp_min(0.0)
