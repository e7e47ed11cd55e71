"""Registry of merge methods and the one entry point `merge`.

Convention (see DESIGN.md): every method returns a mean-like update Delta; the merged model
is theta0 + eta * Delta. Two shapes of method exist:

* coordinate-wise methods see one parameter tensor at a time, stacked over clients as
  ``[K, *shape]``; `merge` streams over tensors so peak extra memory is about K times the
  largest tensor, never K times the model;
* whole-vector methods (norms or distances over the flattened update) receive the list of
  task vectors and must stream themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fl_merge.task_vectors import MergeInputError, StateDict, check_task_vectors


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    fn: the pure function. Coordinate-wise: ``fn(stacked[K, ...], p[K], **params) -> Tensor``.
        Whole-vector: ``fn(task_vectors, p, **params) -> StateDict``. Either form that
        declares a ``local_steps`` argument receives the clients' step counts (float64 [K]
        tensor, or None when unknown).
    params: name -> default value of the method's hyper-parameters (from fn's signature).
    needs_local_steps: the method cannot run without each client's local step count.
    min_clients: a check ``(K, params) -> None`` raising MergeInputError when K is too small.
    """

    name: str
    fn: Callable
    coordinatewise: bool
    params: dict = field(default_factory=dict)
    needs_local_steps: bool = False
    min_clients: Callable[[int, dict], None] | None = None
    summary: str = ""
    takes_local_steps: bool = False


_METHODS: dict[str, MergeMethod] = {}

# Arguments every method receives from `merge` itself, not user hyper-parameters.
_RESERVED = {"stacked", "weights", "task_vectors", "local_steps", "extras"}


def register(
    name: str,
    *,
    coordinatewise: bool,
    needs_local_steps: bool = False,
    min_clients: Callable[[int, dict], None] | None = None,
    aliases: Sequence[str] = (),
) -> Callable[[Callable], Callable]:
    """Decorator registering `fn` as merge method `name` (and its aliases)."""

    def deco(fn: Callable) -> Callable:
        params = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.name not in _RESERVED
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        takes_steps = "local_steps" in inspect.signature(fn).parameters
        for n in (name, *aliases):
            if n in _METHODS:
                raise ValueError(f"merge method '{n}' registered twice")
            _METHODS[n] = MergeMethod(
                n, fn, coordinatewise, params, needs_local_steps, min_clients, summary,
                takes_steps,
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


def check_method_params(method: str, params: Mapping) -> dict:
    """Return the method's full parameters (defaults updated by `params`); raise on unknown
    names. Usable before any training, to fail fast on bad config."""
    m = get_method(method)
    unknown = sorted(set(params) - set(m.params))
    if unknown:
        known = ", ".join(sorted(m.params)) or "none"
        raise MergeInputError(
            f"unknown parameter(s) {unknown} for merge method '{method}' (it takes: {known})"
        )
    return {**m.params, **params}


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
    **params,
) -> StateDict:
    """Delta = method(task_vectors) under the mean convention; theta = theta0 + eta * Delta.

    Validates everything before any arithmetic: the method and its parameters, the task
    vectors (same keys/shapes/dtypes, finite; `names` label clients in errors), weights,
    local steps where the method needs them, and the method's minimum client count.
    The result has the task vectors' dtypes and lives on the CPU.
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
    if m.min_clients is not None:
        m.min_clients(k, full_params)
    dev = resolve_device(device)

    extra = {"local_steps": steps} if m.takes_local_steps else {}
    if not m.coordinatewise:
        out = m.fn(task_vectors, p, **extra, **full_params)
        return {key: v.to("cpu") for key, v in out.items()}

    ref = task_vectors[0]
    delta: StateDict = {}
    if steps is not None and m.takes_local_steps:
        extra = {"local_steps": steps.to(dev)}
    for key, r in ref.items():
        work = torch.float64 if r.dtype == torch.float64 else torch.float32
        # One tensor at a time, stacked over clients: memory ~ K * this tensor.
        stacked = torch.stack([tv[key].to(device=dev, dtype=work) for tv in task_vectors])
        res = m.fn(stacked, p.to(device=dev, dtype=work), **extra, **full_params)
        delta[key] = res.reshape(r.shape).to(device="cpu", dtype=r.dtype)
        del stacked
    return delta
