"""Registry of merge methods and the one entry point `merge`.

Convention (see DESIGN.md): every method returns a mean-like update Delta; the merged model
is theta0 + eta * Delta. Two shapes of method exist:

* coordinate-wise methods see blocks of flattened coordinates stacked over clients,
  ``[K, n]`` (n at most a fixed block size, see `_stream.block_numel`); `merge` streams over
  tensors and blocks, so peak extra memory is one block plus the result, never K times the
  model;
* whole-vector methods (norms, distances or ranks over the flattened update) receive the
  list of task vectors and must stream themselves (helpers in `_stream`).

Methods may also declare per-client extra arrays they need (``needs_extras``, e.g. diagonal
Fisher estimates): `merge(..., extras={"fisher": [dict per client]})` validates them like the
task vectors (same keys and shapes, finite, non-negative) and hands them to the method.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fl_merge.aggregation._stream import iter_blocks, linear_combination, work_dtype
from fl_merge.task_vectors import MergeInputError, StateDict, check_task_vectors


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    fn: the pure function. Coordinate-wise: ``fn(stacked[K, n], p[K], **params) -> Tensor[n]``
        (stacked is scratch: the function may overwrite it). Whole-vector:
        ``fn(task_vectors, p, **params) -> StateDict``. Either form that declares a
        ``local_steps`` argument receives the clients' step counts (float64 [K] tensor, or
        None when unknown); one that declares ``extras`` receives the extra arrays
        (coordinate-wise: name -> stacked [K, n] block; whole-vector: name -> list of
        per-client dicts); a whole-vector one that declares ``device`` gets the resolved
        torch.device for its arithmetic.
    params: name -> default value of the method's hyper-parameters (from fn's signature).
    needs_local_steps: the method cannot run without each client's local step count.
    min_clients: a check ``(K, params) -> None`` raising MergeInputError when K is too small.
    needs_extras: names of per-client extra arrays the method cannot run without.
    check_params: a check ``(params) -> None`` raising MergeInputError on invalid values.
    coefficients: for linear methods (Delta = sum_i c_i tau_i), ``(p, local_steps, **params)
        -> c[K]``; `merge` then streams the clients' rows with fused multiply-adds instead of
        gathering [K, n] blocks (same result as `fn`, fewer memory passes). `fn` stays the
        reference implementation on a stacked block.
    """

    name: str
    fn: Callable
    coordinatewise: bool
    params: dict = field(default_factory=dict)
    needs_local_steps: bool = False
    min_clients: Callable[[int, dict], None] | None = None
    summary: str = ""
    takes_local_steps: bool = False
    needs_extras: tuple[str, ...] = ()
    check_params: Callable[[dict], None] | None = None
    takes_extras: bool = False
    takes_device: bool = False
    coefficients: Callable | None = None


_METHODS: dict[str, MergeMethod] = {}

# Arguments every method receives from `merge` itself, not user hyper-parameters.
_RESERVED = {"stacked", "weights", "task_vectors", "local_steps", "extras", "device"}


def register(
    name: str,
    *,
    coordinatewise: bool,
    needs_local_steps: bool = False,
    min_clients: Callable[[int, dict], None] | None = None,
    aliases: Sequence[str] = (),
    needs_extras: Sequence[str] = (),
    check_params: Callable[[dict], None] | None = None,
    coefficients: Callable | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering `fn` as merge method `name` (and its aliases)."""

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn).parameters
        params = {
            p.name: p.default
            for p in sig.values()
            if p.name not in _RESERVED
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        takes_steps = "local_steps" in sig
        if needs_extras and "extras" not in sig:
            raise ValueError(f"merge method '{name}' needs extras but takes no 'extras' argument")
        for n in (name, *aliases):
            if n in _METHODS:
                raise ValueError(f"merge method '{n}' registered twice")
            _METHODS[n] = MergeMethod(
                n, fn, coordinatewise, params, needs_local_steps, min_clients, summary,
                takes_steps, tuple(needs_extras), check_params, "extras" in sig,
                "device" in sig, coefficients,
            )
        return fn

    return deco


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise MergeInputError(
            f"unknown merge method '{name}'; known: {', '.join(available_methods())}"
        ) from None


def check_method_params(method: str, params: Mapping, num_clients: int | None = None) -> dict:
    """Return the method's full parameters (defaults updated by `params`); raise on unknown
    names or invalid values, and, given `num_clients`, when the method cannot run with that
    many clients. Usable before any training, to fail fast on bad config."""
    m = get_method(method)
    unknown = sorted(set(params) - set(m.params))
    if unknown:
        known = ", ".join(sorted(m.params)) or "none"
        raise MergeInputError(
            f"unknown parameter(s) {unknown} for merge method '{method}' (it takes: {known})"
        )
    full = {**m.params, **params}
    if m.check_params is not None:
        try:
            m.check_params(full)
        except MergeInputError as e:
            raise MergeInputError(f"merge method '{method}': {e}") from None
    if num_clients is not None and m.min_clients is not None:
        m.min_clients(num_clients, full)
    return full


def known_extras() -> set[str]:
    """Names of extra per-client arrays some registered method uses."""
    return {n for m in _METHODS.values() for n in m.needs_extras}


def check_extras(
    method: MergeMethod,
    extras: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None,
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str] | None = None,
) -> dict:
    """Validate per-client extra arrays against the task vectors; return the ones `method`
    uses. Every given array must be known to some method, hold one dict per client with the
    task vectors' keys and shapes, floating point, finite and non-negative (they are
    diagonal second-moment statistics such as Fisher estimates)."""
    extras = dict(extras or {})
    k = len(task_vectors)
    names = list(names) if names is not None else [f"client {i}" for i in range(k)]
    missing = [n for n in method.needs_extras if n not in extras]
    if missing:
        raise MergeInputError(
            f"merge method '{method.name}' needs extras {missing}: pass "
            f"extras={{'{missing[0]}': [one dict of tensors per client]}}"
        )
    unknown = sorted(set(extras) - known_extras())
    if unknown:
        raise MergeInputError(
            f"unknown extras {unknown}; methods use: {sorted(known_extras()) or 'none'}"
        )
    ref = task_vectors[0]
    for ename, per_client in extras.items():
        if isinstance(per_client, Mapping) or len(per_client) != k:
            got = "a dict" if isinstance(per_client, Mapping) else f"{len(per_client)} entries"
            raise MergeInputError(f"extras['{ename}'] must hold one dict per client ({k}), got {got}")
        for name, ex in zip(names, per_client):
            if set(ex.keys()) != set(ref.keys()):
                diff = sorted(set(ex.keys()) ^ set(ref.keys()))
                raise MergeInputError(
                    f"{name}: extras['{ename}'] keys differ from the task vector's: {diff[:5]}"
                )
            for key, v in ex.items():
                if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
                    raise MergeInputError(
                        f"{name}: extras['{ename}']['{key}'] must be a floating-point tensor"
                    )
                if tuple(v.shape) != tuple(ref[key].shape):
                    raise MergeInputError(
                        f"{name}: extras['{ename}']['{key}'] has shape {tuple(v.shape)}, "
                        f"the task vector has {tuple(ref[key].shape)}"
                    )
                if not math.isfinite(float(v.sum())) and not bool(torch.isfinite(v).all()):
                    raise MergeInputError(f"{name}: extras['{ename}']['{key}'] contains NaN or Inf")
                if v.numel() and float(v.min()) < 0:
                    raise MergeInputError(
                        f"{name}: extras['{ename}']['{key}'] has negative entries"
                    )
    return {n: extras[n] for n in method.needs_extras}


def normalized_weights(weights: Sequence[float] | torch.Tensor | None, k: int) -> torch.Tensor:
    """p_i = w_i / sum_j w_j in float64 (uniform when weights is None)."""
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != k:
        raise MergeInputError(f"{w.numel()} weights for {k} task vectors")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise MergeInputError(f"weights must be finite, non-negative and not all zero: {w.tolist()}")
    return w / w.sum()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> cuda when available else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeInputError("device 'cuda' asked for, but no CUDA device is available")
    return dev


def merge(
    method: str,
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None = None,
    local_steps: Sequence[int] | None = None,
    *,
    names: Sequence[str] | None = None,
    device: str | torch.device | None = "cpu",
    extras: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None,
    **params,
) -> StateDict:
    """Delta = method(task_vectors) under the mean convention; theta = theta0 + eta * Delta.

    Validates everything before any arithmetic: the method and its parameters (names and
    values), the task vectors (same keys/shapes/dtypes, finite; `names` label clients in
    errors), weights, local steps where the method needs them, `extras` (per-client arrays
    such as ``{"fisher": [dict per client]}``) where it needs them, and the method's minimum
    client count. Arithmetic runs on `device` ('auto': cuda when available) in float32 at
    least; the result has the task vectors' dtypes and lives on the CPU.
    """
    m = get_method(method)
    full_params = check_method_params(method, params)
    check_task_vectors(task_vectors, names)
    k = len(task_vectors)
    p = normalized_weights(weights, k)
    steps = None
    if local_steps is not None:
        steps = torch.as_tensor(list(local_steps), dtype=torch.float64)
        if steps.numel() != k or bool((steps <= 0).any()):
            raise MergeInputError(f"local_steps must be {k} positive numbers, got {list(local_steps)}")
    if m.needs_local_steps and steps is None:
        raise MergeInputError(f"merge method '{method}' needs every client's local_steps")
    used_extras = check_extras(m, extras, task_vectors, names)
    if m.min_clients is not None:
        try:
            m.min_clients(k, full_params)
        except MergeInputError as e:
            raise MergeInputError(f"merge method '{method}' with {k} clients: {e}") from None
    dev = resolve_device(device)

    extra = {"local_steps": steps} if m.takes_local_steps else {}
    if not m.coordinatewise:
        if m.takes_extras:
            extra["extras"] = used_extras
        if m.takes_device:
            extra["device"] = dev
        out = m.fn(task_vectors, p, **extra, **full_params)
        return {key: v.to("cpu") for key, v in out.items()}

    ref = task_vectors[0]
    if m.coefficients is not None:
        return linear_combination(task_vectors, m.coefficients(p, steps, **full_params), dev)
    if steps is not None and m.takes_local_steps:
        extra = {"local_steps": steps.to(dev)}
    # Keys grouped by working dtype; each group streamed in [K, n] blocks of a reused buffer:
    # memory ~ one block plus the result, whatever the model size.
    flat_out = {key: torch.empty(r.numel(), dtype=r.dtype) for key, r in ref.items()}
    for work in {work_dtype(r.dtype) for r in ref.values()}:
        keys = [key for key, r in ref.items() if work_dtype(r.dtype) == work]
        pw = p.to(device=dev, dtype=work)
        for key, s, e, stacked, ext in iter_blocks(
            task_vectors, dev, work, keys=keys, extra_rows=used_extras
        ):
            kw = {"extras": ext} if m.takes_extras else {}
            res = m.fn(stacked, pw, **extra, **kw, **full_params)
            flat_out[key][s:e].copy_(res.reshape(-1))
    return {key: v.reshape(ref[key].shape) for key, v in flat_out.items()}
