"""Whole-update methods as declared passes over groups of tensors.

Some whole-vector methods read the whole update only through a few global numbers: TIES
(default convention) each client's k-th largest |tau_i| and the majority of the elected
signs, Krum / Multi-Krum the clients they select from the pairwise distances, CClip and the
geometric median the coefficients of their result in the clients' task vectors (from the
Gram matrix), PCB each client's clip bounds and its score's top-ratio cut and maximum,
DARE-TIES TIES's numbers on the masked, rescaled vectors, hetero the Gram matrix itself (its
coefficients follow from it and the weights and normalisers every merge call is given).
Such a method declares, beside its function, ``register(..., global_pass=fn)``:
``fn(task_vectors, p, device, params) -> stats`` (and ``names=`` the clients' names, when fn
takes them) streams over the whole task vectors (memory-mapped in a large-model round, one
block at a time) and returns those numbers; ``merge(method, some_tensors, ...,
stats=stats)`` is then exactly the whole merge restricted to those tensors. A large-model
round (fl_merge/round/group_merge.py) runs the pass once and merges group by group, so its
peak is one group, not one Delta.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fl_merge.core.task_vectors import MergeInputError, check_task_vectors
from fl_merge.merging.registry import (
    check_method_params, get_method, is_per_tensor_exact, normalized_weights, resolve_device,
)

__all__ = ["has_global_pass", "global_statistics"]


def has_global_pass(method: str, params: Mapping[str, Any] | None = None) -> bool:
    """Whether `method` with `params` is merged group by group through its declared pass:
    it declares one and is not per-tensor exact already (then no pass is needed)."""
    return get_method(method).global_pass is not None and not is_per_tensor_exact(method, params)


def global_statistics(
    method: str,
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    names: Sequence[str] | None = None,
    device: str | torch.device | None = "cpu",
    **params,
) -> Any:
    """The statistics `method`'s declared pass computes over the whole `task_vectors`, to be
    given as ``merge(method, part, weights, stats=...)`` for every part (a subset of whole
    tensors, the same weights, device and params). Validates as `merge` does (parameters,
    task vectors, weights, client count) before any arithmetic."""
    m = get_method(method)
    if m.global_pass is None:
        raise MergeInputError(f"merge method '{method}' declares no global_pass; merge it whole")
    full = check_method_params(method, params)
    check_task_vectors(task_vectors, names)
    p = normalized_weights(weights, len(task_vectors))
    if m.min_clients is not None:
        try:
            m.min_clients(len(task_vectors), full)
        except MergeInputError as e:
            raise MergeInputError(f"merge method '{method}' with {len(task_vectors)} clients: {e}") from None
    # a pass whose numbers depend on the clients' names (DARE's masks) takes them as `names`
    kw = ({"names": None if names is None else [str(n) for n in names]}
          if "names" in inspect.signature(m.global_pass).parameters else {})
    with torch.no_grad():
        return m.global_pass(task_vectors, p, resolve_device(device), full, **kw)
