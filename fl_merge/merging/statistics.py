"""The checks of per-client statistics ("extras") before a merge: each layout's own shapes.

A method declares the statistics it needs with `Needs(extras=..., layouts=...)`
(fl_merge/merging/method.py); `fl_merge.merge(..., extras={name: [one dict per client]})` hands
them over and `registry.check_extras` validates them here, before any arithmetic, with one
MergeInputError line naming the client, the statistic and the key:

* DIAGONAL (e.g. "fisher"): the task vectors' keys and shapes, floating point, finite,
  non-negative (diagonal second moments);
* GRAM (e.g. "gram"): for the 2-D weights [d_out, d_in] a client covers (the same keys for
  every client; none at all when a merge runs on tensors without one, e.g. `fl-merge merge` on
  a bias), a floating-point [d_in, d_in] matrix, finite, symmetric, with a
  non-negative diagonal and |G_jk| <= sqrt(G_jj G_kk) (Cauchy-Schwarz: a cheap necessary
  condition of a Gram matrix X^T X; a full eigenvalue test would cost d_in^3 per layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, all_finite
from fl_merge.merging.method import GRAM

# Relative slack of the symmetry and Cauchy-Schwarz tests: a float32 X^T X from a matmul is
# symmetric only up to rounding.
GRAM_RTOL = 1e-4


def check_extras(method: str, needed: Sequence[str], layouts: Mapping[str, str],
                 extras: Mapping | None, task_vectors: Sequence[Mapping[str, torch.Tensor]],
                 names: Sequence[str] | None = None) -> dict:
    """Validate `extras` (name -> one dict of tensors per client) against the task vectors;
    return the ones `needed` by `method`. `layouts`: every known extra name -> its layout
    (names outside it are refused as unknown)."""
    if extras is not None and not isinstance(extras, Mapping):
        raise MergeInputError(
            f"extras must be a dict {{name: [one dict of tensors per client]}}, got {extras!r}"
        )
    extras = dict(extras or {})
    k = len(task_vectors)
    names = [str(n) for n in names] if names is not None else [f"client {i}" for i in range(k)]
    missing = [n for n in needed if n not in extras]
    if missing:
        raise MergeInputError(
            f"merge method '{method}' needs extras {missing}: pass "
            f"extras={{'{missing[0]}': [one dict of tensors per client]}}"
        )
    unknown = sorted(set(extras) - set(layouts), key=str)
    if unknown:
        raise MergeInputError(f"unknown extras {unknown}; methods use: {sorted(layouts) or 'none'}")
    for ename, per_client in extras.items():
        if isinstance(per_client, (Mapping, str, bytes)) or not isinstance(per_client, Sequence) \
                or len(per_client) != k:
            got = ("a dict" if isinstance(per_client, Mapping) else f"{len(per_client)} entries"
                   if isinstance(per_client, Sequence) else type(per_client).__name__)
            raise MergeInputError(f"extras['{ename}'] must hold one dict per client ({k}), got {got}")
        for name, ex in zip(names, per_client):
            if not isinstance(ex, Mapping):
                raise MergeInputError(
                    f"{name}: extras['{ename}'] is {type(ex).__name__}, not a dict of tensors"
                )
        check = _check_gram if layouts[ename] == GRAM else _check_diagonal
        check(ename, per_client, task_vectors[0], names)
    return {n: extras[n] for n in needed}


def _tensor(name: str, ename: str, key: str, v) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point \
            or v.layout != torch.strided or v.device.type == "meta":
        raise MergeInputError(f"{name}: extras['{ename}']['{key}'] must be a floating-point tensor")
    return v


def _check_diagonal(ename: str, per_client, ref: Mapping[str, torch.Tensor], names) -> None:
    for name, ex in zip(names, per_client):
        if set(ex.keys()) != set(ref.keys()):
            diff = sorted(set(ex.keys()) ^ set(ref.keys()))
            raise MergeInputError(f"{name}: extras['{ename}'] keys differ from the task vector's: {diff[:5]}")
        for key, v in ex.items():
            v = _tensor(name, ename, key, v)
            if tuple(v.shape) != tuple(ref[key].shape):
                raise MergeInputError(f"{name}: extras['{ename}']['{key}'] has shape {tuple(v.shape)}, "
                                      f"the task vector has {tuple(ref[key].shape)}")
            if not all_finite(v):
                raise MergeInputError(f"{name}: extras['{ename}']['{key}'] contains NaN or Inf")
            if v.numel() and float(v.min()) < 0:
                raise MergeInputError(f"{name}: extras['{ename}']['{key}'] has negative entries")


def _check_gram(ename: str, per_client, ref: Mapping[str, torch.Tensor], names) -> None:
    first = sorted(per_client[0].keys(), key=str) if per_client else []
    for name, ex in zip(names, per_client):
        stray = sorted((key for key in ex if key not in ref), key=str)
        if stray:
            raise MergeInputError(f"{name}: extras['{ename}'] has {stray[:5]}, which are not task-vector keys")
        if sorted(ex.keys(), key=str) != first:
            diff = sorted(set(ex.keys()) ^ set(first), key=str)
            raise MergeInputError(f"{name}: extras['{ename}'] covers other weights than {names[0]}'s: {diff[:5]}")
        for key, v in ex.items():
            v = _tensor(name, ename, key, v)
            if ref[key].dim() != 2:
                raise MergeInputError(f"{name}: extras['{ename}']['{key}'] is for a weight of shape "
                                      f"{tuple(ref[key].shape)}; Gram matrices are for 2-D weights [d_out, d_in]")
            d_in = ref[key].shape[1]
            if tuple(v.shape) != (d_in, d_in):
                raise MergeInputError(f"{name}: extras['{ename}']['{key}'] has shape {tuple(v.shape)}, "
                                      f"the weight {tuple(ref[key].shape)} needs ({d_in}, {d_in})")
            if not all_finite(v):
                raise MergeInputError(f"{name}: extras['{ename}']['{key}'] contains NaN or Inf")
            if not d_in:
                continue
            g = v.detach().double()
            diag = g.diagonal()
            if bool((diag < 0).any()):
                raise MergeInputError(f"{name}: extras['{ename}']['{key}'] has a negative diagonal "
                                      "entry (a Gram matrix's diagonal is a sum of squares)")
            scale = float(diag.max())
            if float((g - g.T).abs().max()) > GRAM_RTOL * scale:
                raise MergeInputError(f"{name}: extras['{ename}']['{key}'] is not symmetric")
            bound = (diag.unsqueeze(0) * diag.unsqueeze(1)).sqrt()
            if bool((g.abs() > bound * (1 + GRAM_RTOL) + GRAM_RTOL * scale).any()):
                raise MergeInputError(f"{name}: extras['{ename}']['{key}'] is not a Gram matrix "
                                      "(an entry exceeds sqrt(G_jj G_kk))")
