"""Task vectors over state dicts.

A task vector is tau_i = theta_i - theta0, taken over the *merged* parameters only (the
shared backbone). Per-task parameters (heads with task-specific label spaces) are never part
of a task vector and never merged: `split_state` keeps the two apart explicitly.

Everything here is a small pure function on ``dict[str, torch.Tensor]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def one_line(message: object) -> str:
    """`message` as one line: line breaks and other control characters (from user-given
    names and values) are shown escaped."""
    text = str(message)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class MergeInputError(ValueError):
    """Task vectors or merge arguments that cannot be merged, with the reason (one line)."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(one_line(message), *args)


# Per-client extra arrays (e.g. diagonal Fisher) ride in a reply's ArrayRecord under
# "extra.<name>.<parameter>"; they are never weights.
EXTRA_PREFIX = "extra."


def split_extras(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, dict[str, StateDict]]:
    """Split "extra.<name>.<param>" entries off a state dict: (weights, {name: {param: t}})."""
    weights: StateDict = {}
    extras: dict[str, StateDict] = {}
    for k, v in state.items():
        if k.startswith(EXTRA_PREFIX):
            name, _, param = k[len(EXTRA_PREFIX):].partition(".")
            extras.setdefault(name, {})[param] = v
        else:
            weights[k] = v
    return weights, extras


def split_state(
    state: Mapping[str, torch.Tensor], is_merged: Callable[[str], bool]
) -> tuple[StateDict, StateDict]:
    """Split a state dict into (merged parameters, per-task parameters)."""
    merged = {k: v for k, v in state.items() if is_merged(k)}
    per_task = {k: v for k, v in state.items() if not is_merged(k)}
    return merged, per_task


def task_vector(
    finetuned: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    keys: Iterable[str] | None = None,
) -> StateDict:
    """tau = theta_finetuned - theta_base over `keys` (default: every key of `base`).

    Differences are taken in float32 at least (float64 stays float64), so low-precision
    weights do not lose the small update.
    """
    keys = check_pair(finetuned, base, keys)
    out: StateDict = {}
    for k in keys:
        dtype = _work_dtype(base[k].dtype)
        out[k] = finetuned[k].detach().to(dtype) - base[k].detach().to(dtype)
    return out


def check_pair(finetuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
               keys: Iterable[str] | None = None) -> list[str]:
    """The keys of tau = finetuned - base (default: every key of `base`); MergeInputError
    when `finetuned` lacks one or a shape differs. Reads only names and shapes."""
    keys = list(base.keys()) if keys is None else list(keys)
    missing = [k for k in keys if k not in finetuned]
    if missing:
        raise MergeInputError(f"fine-tuned weights lack merged parameters {missing[:5]}")
    for k in keys:
        fs, bs = tuple(finetuned[k].shape), tuple(base[k].shape)
        if bs != fs:
            raise MergeInputError(f"parameter '{k}' has shape {fs} but the base has {bs}")
    return keys


def vector_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a task vector of parameters of `dtype` (float32 at least)."""
    return _work_dtype(dtype)


def apply_update(
    base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], eta: float
) -> StateDict:
    """theta = theta0 + eta * Delta on the keys of `delta`; other keys of `base` are copied.

    The result keeps each base tensor's dtype and device.
    """
    unknown = [k for k in delta if k not in base]
    if unknown:
        raise MergeInputError(f"update has parameters the base model lacks: {unknown[:5]}")
    out: StateDict = {k: v.detach().clone() for k, v in base.items()}
    for k, d in delta.items():
        out[k] = updated_tensor(base[k], d, eta)
    return out


def updated_tensor(b: torch.Tensor, d: torch.Tensor, eta: float) -> torch.Tensor:
    """b + eta * d, computed in b's working dtype (float32 at least) and returned in b's
    dtype and on b's device, with one temporary: eta * d in the working dtype, then b added
    into it (addition commutes: the same bits as (b + eta * d))."""
    out = d.to(device=b.device, dtype=_work_dtype(b.dtype), copy=True).mul_(eta)
    return out.add_(b).to(b.dtype)


class UpdatedState(Mapping[str, torch.Tensor]):
    """`apply_update(base, delta, eta)` one tensor at a time: each lookup computes that
    tensor (same arithmetic), nothing is held, so a merged model of any size is written
    tensor by tensor from (memory-mapped) theta0 and Delta. Unknown Delta keys are refused
    at once, as apply_update refuses them."""

    def __init__(self, base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], eta: float) -> None:
        unknown = [k for k in delta if k not in base]
        if unknown:
            raise MergeInputError(f"update has parameters the base model lacks: {unknown[:5]}")
        self._base, self._delta, self._eta = base, delta, float(eta)

    def __getitem__(self, key: str) -> torch.Tensor:
        b = self._base[key]
        return updated_tensor(b, self._delta[key], self._eta) if key in self._delta else b.detach().clone()

    def __iter__(self):
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def check_task_vectors(
    task_vectors: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None
) -> None:
    """Raise MergeInputError unless all task vectors share keys, shapes and dtypes and are
    finite. `names` label the clients in the message (default: client 0, 1, ...).

    Finiteness is checked by summing each tensor first (a read-only reduction: NaN and
    +-Inf always make the sum non-finite); only a non-finite sum pays for the exact
    element-wise check. Materialising isfinite(v) everywhere cost more than fedavg itself.
    """
    if isinstance(task_vectors, (Mapping, str, bytes)) or not isinstance(task_vectors, Sequence):
        raise MergeInputError(
            f"task_vectors must be a list of dicts of tensors (one per client), "
            f"got {type(task_vectors).__name__}"
        )
    if len(task_vectors) == 0:
        raise MergeInputError("no task vectors to merge")
    if names is None:
        names = [f"client {i}" for i in range(len(task_vectors))]
    elif isinstance(names, (str, bytes, Mapping)) or not isinstance(names, Iterable):
        raise MergeInputError(f"names must be a list of client names, got {names!r}")
    names = [str(n) for n in names]
    if len(names) != len(task_vectors):
        raise MergeInputError(f"{len(names)} names for {len(task_vectors)} task vectors")
    for name, tv in zip(names, task_vectors):
        if not isinstance(tv, Mapping):
            raise MergeInputError(f"{name}'s update is {type(tv).__name__}, not a dict of tensors")
    ref = task_vectors[0]
    if len(ref) == 0:
        raise MergeInputError(f"{names[0]} sent an empty update")
    for name, tv in zip(names, task_vectors):
        if set(tv.keys()) != set(ref.keys()):
            diff = sorted(set(tv.keys()) ^ set(ref.keys()), key=str)
            raise MergeInputError(f"{name} has different parameters than {names[0]}: {diff[:5]}")
        for k, v in tv.items():
            if not isinstance(v, torch.Tensor):
                raise MergeInputError(f"{name}: parameter '{k}' is {type(v).__name__}, not a tensor")
            r = ref[k]
            if tuple(v.shape) != tuple(r.shape):
                raise MergeInputError(
                    f"{name}: parameter '{k}' has shape {tuple(v.shape)}, "
                    f"{names[0]} has {tuple(r.shape)}"
                )
            if v.dtype != r.dtype:
                raise MergeInputError(
                    f"{name}: parameter '{k}' has dtype {v.dtype}, {names[0]} has {r.dtype}"
                )
            if not v.dtype.is_floating_point:
                raise MergeInputError(f"{name}: parameter '{k}' is {v.dtype}, not floating point")
            if v.layout != torch.strided or v.device.type == "meta":
                raise MergeInputError(
                    f"{name}: parameter '{k}' is a {v.layout} tensor on {v.device}; "
                    f"merge needs dense tensors with data"
                )
            if not all_finite(v):
                raise MergeInputError(f"{name}: update of '{k}' contains NaN or Inf")


def check_theta0(method: str, theta0, ref: Mapping[str, torch.Tensor]) -> dict:
    """The base model for a method that needs it: a dict of finite floating-point tensors
    with the task vectors' keys and shapes (its dtype may differ)."""
    if theta0 is None:
        raise MergeInputError(f"merge method '{method}' is defined on the models theta0 + tau_i: "
                              "pass the base model, merge(..., theta0={name: tensor})")
    if not isinstance(theta0, Mapping):
        raise MergeInputError(f"theta0 must be a dict of tensors, got {type(theta0).__name__}")
    if set(theta0.keys()) != set(ref.keys()):
        diff = sorted(set(theta0.keys()) ^ set(ref.keys()), key=str)
        raise MergeInputError(f"theta0's keys differ from the task vectors': {diff[:5]}")
    for key, v in theta0.items():
        if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point \
                or v.layout != torch.strided or v.device.type == "meta":
            raise MergeInputError(f"theta0['{key}'] must be a floating-point tensor")
        if tuple(v.shape) != tuple(ref[key].shape):
            raise MergeInputError(f"theta0['{key}'] has shape {tuple(v.shape)}, the task vector "
                                  f"has {tuple(ref[key].shape)}")
        if not all_finite(v):
            raise MergeInputError(f"theta0['{key}'] contains NaN or Inf")
    return {key: theta0[key] for key in ref}


def all_finite(v: torch.Tensor) -> bool:
    """No NaN or Inf in `v`: a read-only sum first (finite sum => finite entries), the
    element-wise check only when the sum is not finite (NaN/Inf, or an overflowing sum of
    large finite values)."""
    with torch.no_grad():
        return math.isfinite(float(v.sum())) or bool(torch.isfinite(v).all())


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
