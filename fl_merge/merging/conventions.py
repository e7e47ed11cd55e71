"""mergekit's conventions, for the methods that offer them (``convention="mergekit"``).

fl-merge's defaults follow each method's paper or its authors' code (each method's
docstring says which). mergekit (arcee-ai/mergekit 0.1.5: merge_methods/
generalized_task_arithmetic.py, sparsify.py, merge_methods/model_stock.py) resolves the
same edge cases differently; these helpers reproduce its rules on one flattened tensor so
that ``fl-merge merge`` with ``convention=mergekit`` writes what ``mergekit-pytorch`` writes
on the same files (tests/methods/test_mergekit_parity.py compares them tensor by tensor).
The rules, and where ours differ:

* top-k trimming (TIES): exactly k = max(1, floor(density n)) entries of each tensor, the
  ones first in ``torch.argsort(|x|, descending=True)`` (an unstable sort: which of the
  entries tied with the k-th largest are kept is torch's choice); ours keeps every entry
  tied with it (the TIES authors' ``|x| >= kthvalue``), and ranks the whole task vector;
* outlier + small-magnitude masking (Breadcrumbs): the ranks [bottom, n - top) of
  ``torch.sort(|x|)`` are kept (ties split by the sort's order); ours drops every entry tied
  with a cut-off value;
* sign election (TIES, DARE-TIES): s = +1 where sum_i p_i x_i >= 0, else -1 (an exact 0
  elects +); ours takes the majority of the elected signs there (TIES authors' code);
* DARE rescaling: masked * ||x||_1 / ||masked||_1 (the l1 norm kept; unchanged when either
  norm is below 1e-7); ours (the DARE paper) divides by the keep probability 1 - p.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from fl_merge.core.task_vectors import MergeInputError

CONVENTIONS = ("fl-merge", "mergekit")
L1_EPS = 1e-7  # mergekit's tolerance below which a norm is not rescaled
# Coordinates per block of `disjoint_mean`: its temporaries are K x BLOCK (4 MiB each in
# float32 for K = 4), not K x n (1 GiB for K = 4 and a 4096 x 16384 matrix). A power of two.
BLOCK = 1 << 18


def check_convention(params: dict) -> None:
    value = params["convention"]
    if not isinstance(value, str) or value not in CONVENTIONS:
        raise MergeInputError(f"convention must be one of {', '.join(CONVENTIONS)}, got "
                              f"{value!r}")


def _magnitudes(x: torch.Tensor) -> torch.Tensor:
    # mergekit ranks CPU magnitudes in float32 (float64 ones rounded first)
    a = x.abs().reshape(-1)
    return a.float() if a.device.type == "cpu" else a


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor | None:
    """The flat boolean mask of the k = max(1, floor(density n)) largest |x|, the k chosen
    by torch.argsort(|x|, descending=True) (mergekit's magnitude sparsification); None when
    every entry is kept (density >= 1, or x is empty). The sort runs in place on the fresh
    magnitudes (torch.sort with out=, the kernel argsort calls: the same order, one
    n-sized copy fewer)."""
    n = x.numel()
    if density >= 1 or n == 0:
        return None
    mags = _magnitudes(x)  # a fresh tensor (abs copies): sorting it in place is safe
    order = torch.empty(n, dtype=torch.int64, device=x.device)
    torch.sort(mags, descending=True, out=(mags, order))
    del mags
    keep = torch.zeros(n, dtype=torch.bool, device=x.device)
    keep[order[: max(1, int(density * n))]] = True
    return keep


def topk_masks(rows: Sequence[torch.Tensor], density: float,
               workers: int | None = None) -> list[torch.Tensor | None]:
    """`topk_mask` of each row, `workers` rows at a time (default torch.get_num_threads()).

    torch's CPU sort of one row runs on one core, and it is most of a TIES merge's time;
    Python threads run the rows' sorts side by side (torch releases the GIL inside them).
    Each mask is what `topk_mask` gives alone (the sort is a function of its row only).
    Memory: `workers` sorts at once, 12 bytes per entry each (float32 magnitudes sorted in
    place, int64 order)."""
    workers = max(1, min(len(rows), workers or torch.get_num_threads()))
    if workers == 1 or rows[0].device.type != "cpu":
        return [topk_mask(r, density) for r in rows]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda r: topk_mask(r, density), rows))


def topk_exact(x: torch.Tensor, density: float) -> torch.Tensor:
    """x with all but its top k entries (`topk_mask`) zeroed: x * 1 and x * 0 (signed
    zeros), as a 0/1 float mask gives."""
    keep = topk_mask(x, density)
    return x if keep is None else x * keep.reshape(x.shape)


def rank_window(x: torch.Tensor, bottom: int, top: int) -> torch.Tensor:
    """x with its `bottom` smallest and `top` largest |x| zeroed, by the order of
    torch.sort(|x|) (mergekit's magnitude_outliers sparsification, in counts)."""
    n = x.numel()
    keep = torch.zeros(n, dtype=x.dtype, device=x.device)
    keep[torch.sort(_magnitudes(x)).indices[bottom: max(bottom, n - top)]] = 1
    return x * keep.reshape(x.shape)


def l1_rescale(x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """masked * ||x||_1 / ||masked||_1, or masked when either norm is below 1e-7
    (mergekit's RescaleNorm.l1)."""
    before, after = x.abs().sum(), masked.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


def column_blocks(n: int, block: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering n columns: blocks of `block` columns starting at
    multiples of `block`, the last one also taking the remainder (so no block is narrower
    than `block` unless n is)."""
    starts = list(range(0, n - n % block, block)) or [0]
    return [(s, starts[i + 1] if i + 1 < len(starts) else n) for i, s in enumerate(starts)]


def disjoint_mean(rows: Sequence[torch.Tensor], weights: torch.Tensor,
                  masks: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """mergekit's TIES consensus on the K trimmed rows x_i = rows[i] * masks[i] (flat
    tensors of n entries; a mask None keeps the row whole) with weights p[K]: s = +1 where
    sum_i p_i x_i >= 0 else -1, Delta = sum_{i: sign(p_i x_i) = s} p_i x_i / sum of those
    p_i (0 where none agrees). Coordinate by coordinate, so it runs on `column_blocks` of
    BLOCK coordinates: the trimmed [K, n] stack and its temporaries exist one block at a
    time, with the same bits as one pass over the whole stack (each block is wide and
    starts at a multiple of a power of two, so torch sums each coordinate over K along the
    same code path). Every block reuses one set of buffers (written with out=): no
    allocation, no page faults per block; the operations are mergekit's, in its order."""
    masks = list(masks) if masks is not None else [None] * len(rows)
    dtype, device = rows[0].dtype, rows[0].device
    k, n = len(rows), rows[0].numel()
    w = weights.to(dtype).reshape(-1, 1)
    out = torch.empty(n, dtype=dtype, device=device)
    blocks = column_blocks(n, BLOCK)
    width = max(e - s for s, e in blocks)
    wx_buf, agree_buf = (torch.empty(k * width, dtype=dtype, device=device) for _ in range(2))
    pos_buf, neg_buf = (torch.empty(k * width, dtype=torch.bool, device=device) for _ in range(2))
    vote_buf, den_buf = (torch.empty(width, dtype=dtype, device=device) for _ in range(2))
    positive_buf = torch.empty(width, dtype=torch.bool, device=device)
    for s, e in blocks:
        m = e - s
        wx, agree = wx_buf[: k * m].view(k, m), agree_buf[: k * m].view(k, m)
        pos, neg = pos_buf[: k * m].view(k, m), neg_buf[: k * m].view(k, m)
        vote, den, positive = vote_buf[:m], den_buf[:m], positive_buf[:m]
        for i, (r, mask) in enumerate(zip(rows, masks)):
            if mask is None:
                wx[i].copy_(r[s:e])
            else:
                torch.mul(r[s:e], mask[s:e], out=wx[i])
        wx.mul_(w)
        torch.ge(torch.sum(wx, 0, out=vote), 0, out=positive)
        # agree_i = sign(p_i x_i) == s: x > 0 where the vote is >= 0, else x < 0
        torch.where(positive, torch.gt(wx, 0, out=pos), torch.lt(wx, 0, out=neg), out=pos)
        agree.copy_(pos)
        torch.sum(wx.mul_(agree), 0, out=vote)  # the numerator, over the agreeing clients
        torch.sum(agree.mul_(w), 0, out=den)
        den.masked_fill_(torch.eq(den, 0, out=positive), 1)
        torch.div(vote, den, out=out[s:e])
    return out
