"""Streaming helpers shared by the merge methods (private).

Everything here bounds memory by one *block* of K client rows (``[K, n]`` with n at most
`block_numel(K, device)`), never K copies of the model. Blocks are views of one reusable
buffer: a yielded block is only valid until the next one is produced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

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
    largest = max(rows[0][key].numel() for key in keys)
    row = min(block, largest)
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
