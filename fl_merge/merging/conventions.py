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

import torch

from fl_merge.core.task_vectors import MergeInputError

CONVENTIONS = ("fl-merge", "mergekit")
L1_EPS = 1e-7  # mergekit's tolerance below which a norm is not rescaled


def check_convention(params: dict) -> None:
    value = params["convention"]
    if not isinstance(value, str) or value not in CONVENTIONS:
        raise MergeInputError(f"convention must be one of {', '.join(CONVENTIONS)}, got "
                              f"{value!r}")


def _magnitudes(x: torch.Tensor) -> torch.Tensor:
    # mergekit ranks CPU magnitudes in float32 (float64 ones rounded first)
    a = x.abs().reshape(-1)
    return a.float() if a.device.type == "cpu" else a


def topk_exact(x: torch.Tensor, density: float) -> torch.Tensor:
    """x with all but its k = max(1, floor(density n)) largest |x| zeroed, the k chosen
    by torch.argsort(|x|, descending=True) (mergekit's magnitude sparsification)."""
    n = x.numel()
    if density >= 1 or n == 0:
        return x
    keep = torch.zeros(n, dtype=x.dtype, device=x.device)
    keep[torch.argsort(_magnitudes(x), descending=True)[: max(1, int(density * n))]] = 1
    return x * keep.reshape(x.shape)


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


def disjoint_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mergekit's TIES consensus on trimmed x[K, n] with weights p[K]: s = +1 where
    sum_i p_i x_i >= 0 else -1, Delta = sum_{i: sign(p_i x_i) = s} p_i x_i / sum of
    those p_i (0 where none agrees)."""
    w = weights.to(x.dtype).reshape(-1, 1)
    wx = x * w
    positive = wx.sum(0) >= 0
    agree = torch.where(positive, wx > 0, wx < 0).to(x.dtype)
    num = (wx * agree).sum(0)
    den = (w * agree).sum(0)
    return num / torch.where(den == 0, torch.ones_like(den), den)
