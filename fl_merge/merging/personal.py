"""What a personal merge method returns: one model per client, not one shared Delta.

A personal method (``register(..., personal=True)``, e.g. EMR-Merging) gives client i its own
update Delta_i; client i's model is theta0 + eta * Delta_i, and each client is scored on its
own model only. The result is held compactly as EMR's paper stores it (Huang et al., NeurIPS
2024, Sec. 3): one shared vector, one boolean mask and one scale per client,

    Delta_i = scales[i] * masks[i] ⊙ unified,

so memory is one model in the task vectors' dtype plus K bits per coordinate (bool: one byte
each), never K models. `delta(i)` builds one client's Delta on demand.

`PersonalDeltas` is deliberately not a Mapping: code that expects one shared Delta (a merged
state, `fl-merge merge`, a soup) fails loudly instead of treating the shared vector as a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import math

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict, all_finite, apply_update


@dataclass(frozen=True)
class PersonalDeltas:
    """unified: the shared vector (the task vectors' keys, shapes and dtypes); masks[i]: client
    i's bool mask per key; scales[i]: its scalar; names[i]: its name (`delta` accepts either
    the name or the position)."""

    unified: StateDict
    masks: list[dict[str, torch.Tensor]]
    scales: list[float]
    names: list[str]

    def __post_init__(self) -> None:
        k = len(self.names)
        if len(self.masks) != k or len(self.scales) != k:
            raise ValueError(f"PersonalDeltas: {len(self.masks)} masks and {len(self.scales)} scales "
                             f"for {k} clients")

    def __len__(self) -> int:
        return len(self.names)

    def index(self, client: int | str) -> int:
        """The position of `client` (a position or a name); MergeInputError naming the clients."""
        if isinstance(client, bool) or not isinstance(client, (int, str)):
            raise MergeInputError(f"a client is a position or a name, got {client!r}")
        if isinstance(client, int):
            if not 0 <= client < len(self):
                raise MergeInputError(f"client {client} out of range: {len(self)} clients")
            return client
        try:
            return self.names.index(client)
        except ValueError:
            raise MergeInputError(f"no client named '{client}'; clients: {', '.join(self.names)}") from None

    def delta(self, client: int | str) -> StateDict:
        """Client i's own update Delta_i = scales[i] * masks[i] * unified (unified's dtypes)."""
        i = self.index(client)
        s = self.scales[i]
        return {key: torch.where(self.masks[i][key], u * s, torch.zeros((), dtype=u.dtype))
                for key, u in self.unified.items()}

    def model(self, theta0: Mapping[str, torch.Tensor], client: int | str, eta: float = 1.0) -> StateDict:
        """Client i's model theta0 + eta * Delta_i (eta 1: the paper's model)."""
        return apply_update(dict(theta0), self.delta(client), eta)

    def nbytes(self) -> int:
        """Bytes of one client's Delta (what one evaluation message carries per candidate)."""
        return sum(v.numel() * v.element_size() for v in self.unified.values())


def is_personal(delta: object) -> bool:
    return isinstance(delta, PersonalDeltas)


def own_delta(delta: Mapping[str, torch.Tensor] | PersonalDeltas, client: int | str) -> StateDict:
    """The Delta a client scores: its own for a personal result, else the shared one."""
    return delta.delta(client) if isinstance(delta, PersonalDeltas) else dict(delta)


def delta_nbytes(delta: Mapping[str, torch.Tensor] | PersonalDeltas) -> int:
    """Bytes of the Delta one client receives."""
    if isinstance(delta, PersonalDeltas):
        return delta.nbytes()
    return sum(v.numel() * v.element_size() for v in delta.values())


def check_personal_inputs(method: str, weights: Sequence[float] | torch.Tensor | None,
                          names: Sequence[str] | None) -> None:
    """What a personal method cannot take, before any arithmetic (MergeInputError, one line):
    unequal client weights (it gives each client its own model: weights mean nothing to it;
    None or equal weights pass) and repeated client names (a client's model is found by its
    name)."""
    if names is not None:
        labels = [str(n) for n in names]
        dup = sorted({n for n in labels if labels.count(n) > 1})
        if dup:
            raise MergeInputError(f"merge method '{method}': client names must be unique, {dup} repeat")
    if weights is None:
        return
    w = [float(v) for v in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if w and any(v != w[0] for v in w):
        raise MergeInputError(
            f"merge method '{method}' takes no client weights: it gives each client its own model "
            "(use uniform weights: weighting=uniform, weights=None)")


def finish_personal(method: str, out: object, k: int, names: Sequence[str] | None) -> PersonalDeltas:
    """A personal method's result moved to the CPU, named by the clients' names (positions
    "0".."K-1" without names) and checked finite (`merge` calls it)."""
    if not isinstance(out, PersonalDeltas):
        raise TypeError(f"personal merge method '{method}' returned {type(out).__name__}, not PersonalDeltas")
    labels = [str(n) for n in names] if names is not None else [str(i) for i in range(k)]
    unified = {key: v.to("cpu") for key, v in out.unified.items()}
    for key, v in unified.items():
        if not all_finite(v):
            raise MergeInputError(f"merge method '{method}': the unified vector of '{key}' overflows {v.dtype}")
    bad = [labels[i] for i, s in enumerate(out.scales) if not math.isfinite(s)]
    if bad:
        raise MergeInputError(f"merge method '{method}': the scale of {', '.join(bad)} is not finite")
    for i, s in enumerate(out.scales):  # each client's Delta_i must fit its dtype too
        for key, u in unified.items():
            if u.numel() and s * float(torch.where(out.masks[i][key].cpu(), u.abs(), 0).max()) > \
                    torch.finfo(u.dtype).max:
                raise MergeInputError(f"merge method '{method}': the update of {labels[i]} overflows "
                                      f"{u.dtype} at '{key}' (its scale {s:.4g} times the unified vector)")
    return PersonalDeltas(unified, [{key: v.to("cpu") for key, v in mk.items()} for mk in out.masks],
                          [float(s) for s in out.scales], labels)
