"""A round's Deltas merged group by group and kept on disk (large models: run-config
`chunk-mib` or `spill`), so that the ServerApp never holds a whole Delta, let alone one per
method, while the round goes on.

The merged tensors are cut into groups of at most `limit` bytes of task-vector data
(`fl_merge.round.chunks.chunk_groups`, the grouping of chunked messages); the method runs on
each group alone: its task vectors, extras (Fisher, Gram matrices) and theta0 restricted to
the group's tensors, and each group's Delta is written to a spill file at once. The result
is a read-only mapping over those files (`fl_merge.io.spill.JoinedState`), read one tensor at
a time by everything that follows (the scoring messages, the merged-model writer).

That is the method itself where running it on a set of whole tensors is (`groupable`):
coordinate-wise methods and those that declare `per_tensor_exact` (a group is a union of
tensors), and the whole-update methods that declare a `global_pass`
(fl_merge/merging/passes.py): the pass streams once over the whole (memory-mapped) task
vectors for a few global numbers, then each group is merged with them fixed, exactly that
group of the whole merge: TIES (default convention: each client's top-k threshold and the
majority tie sign), Krum and Multi-Krum (the selected clients), CClip, the geometric
median and hetero (their coefficients in the task vectors, from the Gram matrix), PCB and
DARE-TIES. Their peak is one group, not one Delta. A LiNeS-scaled update of such a method
is its grouped Delta scaled tensor by tensor as it is written (alpha="auto", the l1 ratio
of the whole update, read from the files one tensor at a time: fl_merge/merging/lines.py
`lines_scales`), bit for bit the whole LiNeS-scaled merge. The others (a personal method's
per-client masks) are merged as before, whole, and then written to disk: their peak is one
Delta, not one per method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fl_merge.io.spill import JoinedState, KeyView, SpillDir
from fl_merge.merging.personal import is_personal
from fl_merge.merging.passes import has_global_pass
from fl_merge.merging.registry import get_method, is_per_tensor_exact
from fl_merge.round.chunks import DEFAULT_GROUP_BYTES, chunk_groups

__all__ = ["DEFAULT_GROUP_BYTES", "groupable", "restrict", "merge_in_groups", "keep_on_disk"]

Tensors = Mapping[str, torch.Tensor]
# (task vectors, extras or None, theta0 or None) of one group -> that group's Delta
GroupMerge = Callable[[Sequence[Tensors], Mapping[str, Sequence[Tensors]] | None, Tensors | None], Tensors]


def groupable(method: str, params: Mapping[str, Any]) -> bool:
    """Whether `method` with `params` merged on groups of whole tensors is the method itself:
    per-tensor exact (coordinate-wise methods are) or given its declared global pass's
    statistics (`merge(..., stats=...)`), and not personal. (A LiNeS-scaled update is its
    method's grouped Delta scaled tensor by tensor: fl_merge/round/merging.py.)"""
    m = get_method(method)
    return not m.personal and (
        is_per_tensor_exact(method, params) or has_global_pass(method, params))


def restrict(state: Tensors, keys: Sequence[str]) -> KeyView:
    """`state`'s tensors named in `keys` (those it holds), still lazy."""
    return KeyView(state, {k: k for k in keys if k in state})


def merge_in_groups(merge_group: GroupMerge, task_vectors: Sequence[Tensors],
                    extras: Mapping[str, Sequence[Tensors]] | None, theta0: Tensors | None,
                    limit: int, store: SpillDir, name: str) -> JoinedState:
    """Delta, group by group: `merge_group` on each group's task vectors, extras and theta0,
    each group's result written to `store` before the next group is merged. Returns the
    Delta as one read-only mapping over the files (the task vectors' key order)."""
    groups = chunk_groups(task_vectors[0], limit, "the task vectors")
    parts = []
    for i, keys in enumerate(groups):
        part = merge_group([restrict(tv, keys) for tv in task_vectors],
                           None if extras is None else
                           {n: [restrict(e, keys) for e in per_client] for n, per_client in extras.items()},
                           None if theta0 is None else restrict(theta0, keys))
        parts.append(store.write(f"{name}-{i}", part))
        del part
    return JoinedState(parts)


def keep_on_disk(delta: Any, store: SpillDir, name: str) -> Any:
    """A whole Delta written to `store` and returned memory-mapped (a personal method's
    PersonalDeltas is returned as it is: it holds per-client parts, not one update)."""
    if is_personal(delta):
        return delta
    return store.write(name, delta)
