"""mergekit's rules (fl_merge/merging/conventions.py) against mergekit's own formulas written
out on whole tensors: the top-k masks (its torch.argsort(|x|, descending=True)[:k]) and
the TIES consensus (its get_mask + normalised sum), bit for bit, on fp16 task vectors whose
magnitudes tie at the top-k threshold and whose votes hold exact zeros and signed zeros."""

from __future__ import annotations

import pytest
import torch

from fl_merge.merging import conventions


def fp16_rows(k: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """float32 differences of coarse fp16 values (multiples of 1/64): few distinct
    magnitudes, so many ties."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 64).round().half().float() / 64
    rows = [(torch.randn(n, generator=g) * 64).round().half().float() / 64 - base for _ in range(k)]
    for r in rows:
        r[: n // 10] = 0.0  # exact zeros, some of them negative below
    rows[0][: n // 20] = -0.0
    return rows


def argsort_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit 0.1.5 sparsify.magnitude's choice of the kept entries."""
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[torch.argsort(x.abs().reshape(-1).float(), descending=True)[: max(1, int(density * x.numel()))]] = True
    return keep


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_topk_masks_are_mergekits_argsort_choice(workers, density):
    rows = fp16_rows(4, 200_003)
    kth = torch.sort(rows[0].abs(), descending=True).values[int(density * rows[0].numel()) - 1]
    assert int((rows[0].abs() == kth).sum()) > 10  # the threshold is tied: the order decides
    masks = conventions.topk_masks(rows, density, workers=workers)
    for r, m in zip(rows, masks):
        assert torch.equal(m, argsort_mask(r, density))
        assert int(m.sum()) == int(density * r.numel())


def test_topk_masks_keep_everything_at_density_one_and_empty_rows():
    rows = fp16_rows(2, 100)
    assert conventions.topk_masks(rows, 1.0, workers=2) == [None, None]
    assert conventions.topk_masks([torch.empty(0)] * 3, 0.5, workers=2) == [None] * 3


def mergekit_consensus(rows, weights, masks):
    """mergekit 0.1.5 generalized_task_arithmetic.merge_group (ties, normalize) on one
    tensor: deltas * weights, get_mask(method='sum'), masked sum / masked weights."""
    deltas = torch.stack([r if m is None else r * m.to(r.dtype) for r, m in zip(rows, masks)])
    w = weights.to(deltas.dtype).reshape(-1, 1)
    deltas = deltas * w
    sign = deltas.sign()
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    mask = (sign == majority).to(deltas.dtype)
    mixed = (deltas * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed / divisor


@pytest.mark.parametrize("k", [1, 3, 4, 5])
@pytest.mark.parametrize("block", [256, 1 << 18])
def test_disjoint_mean_is_mergekits_consensus_bit_for_bit(monkeypatch, k, block):
    monkeypatch.setattr(conventions, "BLOCK", block)
    rows = fp16_rows(k, 3 * 256 * 7 + 5 if block == 256 else (1 << 19) + 77, seed=k)
    masks = [conventions.topk_mask(r, 0.3) for r in rows]
    masks[-1] = None  # one row kept whole
    weights = torch.linspace(0.5, 1.5, k)
    weights /= weights.sum()
    ours = conventions.disjoint_mean(rows, weights, masks)
    ref = mergekit_consensus(rows, weights, masks)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
