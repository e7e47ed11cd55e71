"""A model's weights set in place, one tensor at a time: theta0 + eta * Delta assembled
straight into the parameters of one model that is reused for every candidate.

Scoring a candidate used to build a new state dict (theta0 + eta * Delta, a copy of the
model) and then a new model from it (another copy, load_state_dict copying into it): two
to three models besides theta0 and Delta. Here the names and shapes are checked first
(nothing is written when they disagree), then each tensor of the model is overwritten from
`state` (and `delta`), with `fl_merge.core.task_vectors.apply_update`'s arithmetic: in
float32 at least, rounded to the base tensor's dtype, then copied into the parameter, so
the model holds exactly what `load_state_dict(apply_update(state, delta, eta))` gave. The
arithmetic runs in blocks of BLOCK elements, so one candidate costs the model plus a block,
not a float32 copy of the largest tensor. `state` and `delta` may be memory-mapped
(fl_merge.io.spill.MappedState): each tensor is looked up once and freed after its copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fl_merge.core.task_vectors import MergeInputError, updated_tensor

BLOCK = 1 << 22  # elements per step of theta0 + eta * Delta: 16 MiB of float32


class WeightNamesError(ValueError):
    """Weights whose names or shapes do not fit the model (one line)."""


@torch.no_grad()
def assign_tensor_(target: torch.Tensor, base: torch.Tensor, delta: torch.Tensor | None = None,
                   eta: float = 0.0, block: int = BLOCK) -> None:
    """target <- base + eta * delta (just base when delta is None), elementwise: computed in
    vector_dtype(base.dtype) on base's device (`updated_tensor`), rounded to base's dtype, copied into target
    (cast to target's dtype and device). Block by block over the flattened tensors: each
    element's arithmetic is the same as on the whole tensor."""
    if tuple(base.shape) != tuple(target.shape) or (delta is not None and tuple(delta.shape) != tuple(base.shape)):
        raise WeightNamesError(f"shapes differ: target {list(target.shape)}, base {list(base.shape)}"
                               + (f", delta {list(delta.shape)}" if delta is not None else ""))
    if delta is None:
        target.copy_(base)
        return
    if not target.is_contiguous():  # not seen in practice: the whole tensor at once
        target.copy_(updated_tensor(base, delta, eta))
        return
    flat_t, flat_b, flat_d = target.view(-1), base.reshape(-1), delta.reshape(-1)
    for start in range(0, flat_t.numel(), block):
        part = slice(start, start + block)
        flat_t[part].copy_(updated_tensor(flat_b[part], flat_d[part], eta))


def check_weight_names(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str,
                       delta: Mapping[str, torch.Tensor] | None = None, what: str = "model") -> None:
    """WeightNamesError unless `state`'s names under `prefix` are exactly `module`'s state
    dict names (parameters and persistent buffers) with the same shapes; MergeInputError for
    a `delta` name that `state` lacks (as apply_update). Reads names and shapes only."""
    if delta is not None and (unknown := [k for k in delta if k not in state]):
        raise MergeInputError(f"update has parameters the base model lacks: {unknown[:5]}")
    own = module.state_dict()
    given = [k[len(prefix):] for k in state if k.startswith(prefix)]
    missing = [prefix + k for k in own if k not in set(given)]
    unexpected = [prefix + k for k in given if k not in own]
    if missing or unexpected:
        raise WeightNamesError(f"{what}: the weights lack {missing[:5]} and have {unexpected[:5]} "
                               f"that the model does not ({len(missing)} missing, {len(unexpected)} "
                               f"unexpected under '{prefix}')")
    for k, t in own.items():
        shape = tuple(state[prefix + k].shape)
        if shape != tuple(t.shape):
            raise WeightNamesError(f"{what}: '{prefix}{k}' has shape {list(shape)} but the model's "
                                   f"is {list(t.shape)}")
        if delta is not None and prefix + k in delta and tuple(delta[prefix + k].shape) != shape:
            raise MergeInputError(f"update '{prefix}{k}' has shape {list(delta[prefix + k].shape)} "
                                  f"but the base has {list(shape)}")


@torch.no_grad()
def assign_weights_(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "",
                    delta: Mapping[str, torch.Tensor] | None = None, eta: float = 0.0,
                    what: str = "model") -> None:
    """`module`'s parameters and persistent buffers <- state[prefix + name] (+ eta *
    delta[prefix + name] where delta has it), in place; everything checked first."""
    check_weight_names(module, state, prefix, delta, what)
    for k, target in module.state_dict().items():  # detached views of the module's own storage
        name = prefix + k
        assign_tensor_(target, state[name], delta[name] if delta is not None and name in delta else None, eta)
