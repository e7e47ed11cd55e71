"""Registry of merge methods and the one entry point `merge`.

Convention (docs/methods.md): every method returns a mean-like update Delta; the merged model
is theta0 + eta * Delta. Two shapes of method exist:

* coordinate-wise methods see blocks of flattened coordinates stacked over clients,
  ``[K, n]`` (n at most a fixed block size, see `streaming.block_numel`); `merge` streams over
  tensors and blocks, so peak extra memory is one block plus the result, never K times the
  model;
* whole-vector methods (norms, distances or ranks over the flattened update) receive the
  list of task vectors and must stream themselves (helpers in `streaming`).

A method file registers its function with `register(...)`, which holds everything fl-merge
reads about the method beside it (fl_merge/merging/method.py, `MergeMethod`): its search
space, lambda units, per-tensor exactness, the client statistics it needs (`Needs`), its
paper and formula. Per-client extra arrays a method needs (``Needs(extras=...)``, e.g.
diagonal Fisher estimates) arrive as `merge(..., extras={"fisher": [dict per client]})`,
validated like the task vectors (same keys and shapes, finite, non-negative).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence

import torch

from fl_merge.merging import statistics
from fl_merge.merging.streaming import iter_blocks, linear_combination, work_dtype
from fl_merge.merging.per_client import (  # noqa: F401  (public here too)
    local_steps_tensor,
    normaliser_values,
    normalisers_tensor,
    normalized_weights,
)
from fl_merge.core.registration import METHOD_MODULES, BuiltinRegistry
from fl_merge.merging.personal import PersonalDeltas, check_personal_inputs, finish_personal
from fl_merge.merging.method import (  # noqa: F401  (public here too: method files import them)
    DIAGONAL,
    GRAM,
    Derived,
    MergeMethod,
    Needs,
    Paper,
    is_integer,
    is_number,
    number_param,
)
from fl_merge.core.task_vectors import (
    MergeInputError, StateDict, all_finite, check_task_vectors, check_theta0,
)


# Loads the built-in methods (fl_merge.methods) on first use: fl_merge/core/registration.py.
_METHODS: dict[str, MergeMethod] = BuiltinRegistry(METHOD_MODULES)

# Arguments every method receives from `merge` itself, not user hyper-parameters.
_RESERVED = {"stacked", "weights", "task_vectors", "local_steps", "normalisers", "names",
             "extras", "device", "theta0", "stats"}


def register(
    name: str,
    *,
    coordinatewise: bool,
    needs: Needs = Needs(),
    space: Mapping[str, tuple | Derived] | None = None,
    lambda_scale: str | Callable[[dict], str] = "sum",
    per_tensor_exact: bool | Callable[[dict], bool] | None = None,
    paper: Paper | str | None = None,
    formula: str = "",
    aliases: Sequence[str] = (),
    min_clients: Callable[[int, dict], None] | None = None,
    check_params: Callable[[dict], None] | None = None,
    coefficients: Callable | None = None,
    merges_matrices: bool = False,
    personal: bool = False,
    global_pass: Callable | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering `fn` as merge method `name` (and its aliases), with everything
    fl-merge reads about it (`MergeMethod` says what each declaration means). Its
    hyper-parameters and their defaults are fn's signature. per_tensor_exact None: True for
    a coordinate-wise method (per tensor is the method), False otherwise."""

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn).parameters
        params = {
            p.name: p.default
            for p in sig.values()
            if p.name not in _RESERVED
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        if not isinstance(needs, Needs):
            raise ValueError(f"merge method '{name}': needs must be a Needs(...), got {needs!r}")
        if needs.extras and "extras" not in sig:
            raise ValueError(f"merge method '{name}' needs extras but takes no 'extras' argument")
        if needs.theta0 and (coordinatewise or "theta0" not in sig):
            raise ValueError(f"merge method '{name}' needs theta0: it must be whole-vector and "
                             "take a 'theta0' argument")
        known = extra_layouts()
        clash = [n for n in needs.extras if known.get(n, needs.layout(n)) != needs.layout(n)]
        if clash:
            raise ValueError(f"merge method '{name}': extra '{clash[0]}' is laid out as "
                             f"{known[clash[0]]} by other methods, not {needs.layout(clash[0])}")
        if coordinatewise and any(needs.layout(n) != DIAGONAL for n in needs.extras):
            raise ValueError(f"merge method '{name}': a coordinate-wise method takes only "
                             "per-coordinate (DIAGONAL) extras; make it whole-vector")
        if personal and (coordinatewise or coefficients is not None):
            raise ValueError(f"merge method '{name}': a personal method is a whole-vector one "
                             "returning PersonalDeltas (coordinatewise=False, no coefficients)")
        if global_pass is not None and (coordinatewise or personal or "stats" not in sig):
            raise ValueError(f"merge method '{name}' declares a global_pass: it must be whole-vector, "
                             "not personal, and take a 'stats' argument (fl_merge/merging/passes.py)")
        knobs = dict(space or {})
        unknown = sorted(set(knobs) - set(params))
        if unknown:
            raise ValueError(f"merge method '{name}' declares a search space for {unknown}, which "
                             f"are not its parameters ({', '.join(params) or 'none'})")
        bad = [k for k, v in knobs.items() if not isinstance(v, Derived)
               and (not isinstance(v, (tuple, list)) or not v)]
        if bad:
            raise ValueError(f"merge method '{name}': the space of {bad[0]} must be a non-empty "
                             f"tuple of values or a Derived grid, got {knobs[bad[0]]!r}")
        method = MergeMethod(
            name, fn, coordinatewise, params, needs=needs,
            space={k: v if isinstance(v, Derived) else tuple(v) for k, v in knobs.items()},
            lambda_scale=lambda_scale,
            per_tensor_exact=coordinatewise if per_tensor_exact is None else per_tensor_exact,
            paper=Paper(paper) if isinstance(paper, str) else paper, formula=formula,
            summary=(inspect.getdoc(fn) or "").split("\n")[0], aliases=tuple(aliases),
            min_clients=min_clients, check_params=check_params, coefficients=coefficients,
            merges_matrices=merges_matrices, personal=bool(personal), global_pass=global_pass,
            takes_local_steps="local_steps" in sig, takes_normalisers="normalisers" in sig,
            takes_names="names" in sig, takes_extras="extras" in sig, takes_device="device" in sig,
            takes_theta0="theta0" in sig and not coordinatewise,
        )
        for n in (name, *aliases):
            if n in _METHODS:
                raise ValueError(f"merge method '{n}' registered twice")
        for n in (name, *aliases):
            _METHODS[n] = dataclasses.replace(method, name=n)
        return fn

    return deco


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MergeMethod:
    if not isinstance(name, str):
        raise MergeInputError(
            f"merge method must be a name, got {name!r}; known: {', '.join(available_methods())}"
        )
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


def replace_method(name: str, **fields) -> None:
    """Change declarations of a registered method (and of its aliases), e.g. its space."""
    fn = get_method(name).fn
    for n, m in list(_METHODS.items()):
        if m.fn is fn:
            _METHODS[n] = dataclasses.replace(m, **fields)


def register_again(name: str, fn: Callable) -> bool:
    """Register `fn`, already registered under another name (a method file a plugin names by
    its function), as `name` too, with every declaration it carries. False when `fn` is not
    registered (the caller then registers it plainly)."""
    declared = next((m for m in _METHODS.values() if m.fn is fn), None)
    if declared is None:
        return False
    if name in _METHODS:
        raise ValueError(f"merge method '{name}' registered twice")
    _METHODS[name] = dataclasses.replace(declared, name=name, aliases=())
    return True


def check_model_fits(method: str, shapes: Mapping[str, Sequence[int]]) -> None:
    """MergeInputError (one line) when `method` merges weight matrices (`merges_matrices`)
    and none of the merged tensors `shapes` (key -> shape) is 2-D: the SVD and
    least-squares methods would only average (or keep) every tensor. Called on theta0 before
    any training and on the base checkpoint before `fl-merge merge` writes anything."""
    m = get_method(method)
    if m.merges_matrices and shapes and not any(len(s) == 2 and 0 not in s for s in shapes.values()):
        some = ", ".join(f"{k} {list(s)}" for k, s in list(shapes.items())[:3])
        raise MergeInputError(
            f"merge method '{method}' merges 2-D weight matrices, but none of the {len(shapes)} "
            f"merged tensors is one ({some}{', ...' if len(shapes) > 3 else ''}): it would only "
            "average them; merge the model's linear weights (merge-keys) or use fedavg")


def is_per_tensor_exact(method: str, params: Mapping | None = None) -> bool:
    """Whether `method` with `params` run on each tensor alone is the method itself (its
    `per_tensor_exact` declaration, evaluated at its full parameters)."""
    m = get_method(method)
    exact = m.per_tensor_exact
    return bool(exact({**m.params, **dict(params or {})}) if callable(exact) else exact)


def known_extras() -> set[str]:
    """Names of extra per-client arrays some registered method uses."""
    return set(extra_layouts())


def extra_layouts() -> dict[str, str]:
    """Every extra some registered method uses -> its layout (`Needs.layouts`)."""
    return {n: m.needs.layout(n) for m in _METHODS.values() for n in m.needs.extras}


def check_extras(
    method: MergeMethod,
    extras: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None,
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str] | None = None,
) -> dict:
    """Validate per-client extra arrays against the task vectors; return the ones `method`
    uses. Every given array must be known to some method and hold one dict per client, laid
    out as its layout says (fl_merge/merging/statistics.py): a DIAGONAL one (e.g. Fisher) with
    the task vectors' keys and shapes, finite and non-negative; a GRAM one a symmetric
    [d_in, d_in] matrix per 2-D weight it covers."""
    return statistics.check_extras(method.name, method.needs.extras, extra_layouts(), extras,
                                   task_vectors, names)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> cuda when available else cpu."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise MergeInputError(f"device must be 'cpu', 'cuda', 'cuda:<n>' or 'auto', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise MergeInputError(
            f"device must be 'cpu', 'cuda', 'cuda:<n>' or 'auto', got {device!r}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeInputError("device 'cuda' asked for, but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeInputError(
                f"device '{dev}' asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type != "cpu":
        raise MergeInputError(f"device must be 'cpu', 'cuda', 'cuda:<n>' or 'auto', got {device!r}")
    return dev


def merge(
    method: str,
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None = None,
    local_steps: Sequence[int] | None = None,
    *,
    normalisers: Sequence[float | None] | None = None,
    names: Sequence[str] | None = None,
    device: str | torch.device | None = "cpu",
    extras: Mapping[str, Sequence[Mapping[str, torch.Tensor]]] | None = None,
    theta0: Mapping[str, torch.Tensor] | None = None,
    stats=None,
    **params,
) -> StateDict | PersonalDeltas:
    """Delta = method(task_vectors) under the mean convention; theta = theta0 + eta * Delta.

    A personal method (EMR) returns a `PersonalDeltas` instead: client i's own update is
    ``result.delta(i)`` (or by name), its model ``result.model(theta0, i, eta)``; it refuses
    unequal `weights`.

    Validates everything before any arithmetic: the method and its parameters (names and
    values), the task vectors (same keys/shapes/dtypes, finite; `names` label clients in
    errors), weights, local steps where the method needs them, `normalisers` (FedNova's
    a_i = ||a_i||_1 per client, as reported by the client for the optimizer it ran, None for
    a client that reported none: methods that use them fall back to its local steps, the
    plain-SGD normaliser, with a warning), `extras` (per-client arrays
    such as ``{"fisher": [dict per client]}``) where it needs them, `theta0` (the base
    model, same keys and shapes, finite) for methods defined on the models theta0 + tau_i
    (`Needs(theta0=True)`; ignored by the others), and the method's minimum client count.
    `stats`: what the method's `global_pass` returned on the whole task vectors
    (fl_merge/merging/passes.py), for a merge of some of their tensors that equals that
    part of the whole merge; only for a method that declares a pass. Arithmetic runs on `device` ('auto': cuda when available) in float32 at
    least; the result has the task vectors' dtypes and lives on the CPU, and is finite (a
    result that overflows its dtype is a MergeInputError naming the parameter). Every
    invalid input is a MergeInputError with a one-line message, never an error from torch.
    """
    m = get_method(method)
    full_params = check_method_params(method, params)
    if stats is not None and m.global_pass is None:
        raise MergeInputError(f"merge method '{method}' declares no global_pass: stats are not for it")
    check_task_vectors(task_vectors, names)
    k = len(task_vectors)
    p = normalized_weights(weights, k)
    if m.personal:
        check_personal_inputs(method, weights, names)
    steps = local_steps_tensor(local_steps, k)
    if m.needs.local_steps and steps is None:
        raise MergeInputError(f"merge method '{method}' needs every client's local_steps")
    norm = None
    if m.takes_normalisers:
        norm = normalisers_tensor(normalisers, steps, k, names)
        if m.needs.normalisers and norm is None:
            raise MergeInputError(
                f"merge method '{method}' needs every client's local_steps or normalisers")
    else:  # unused by this method, but junk is still an error
        normaliser_values(normalisers, k)
    used_extras = check_extras(m, extras, task_vectors, names)
    base = check_theta0(method, theta0, task_vectors[0]) if m.takes_theta0 else None
    if m.min_clients is not None:
        try:
            m.min_clients(k, full_params)
        except MergeInputError as e:
            raise MergeInputError(f"merge method '{method}' with {k} clients: {e}") from None
    dev = resolve_device(device)
    # Inputs that require grad must not drag autograd into the arithmetic (out= kernels
    # refuse them); Delta is data, never part of a graph.
    with torch.no_grad():
        per_client = {"local_steps": steps, "normalisers": norm,
                      "names": None if names is None else [str(n) for n in names]}
        out = _run(m, task_vectors, p, per_client, used_extras, full_params, dev, base, stats)
    if m.personal:
        return finish_personal(method, out, k, names)
    for key, v in out.items():
        if not all_finite(v):
            raise MergeInputError(
                f"merge method '{method}': the merged update of '{key}' overflows "
                f"{v.dtype} (inputs or coefficients too large for the dtype)"
            )
    return out


def _run(m: MergeMethod, task_vectors, p, per_client, used_extras, full_params, dev,
         theta0=None, stats=None) -> StateDict:
    takes = {"local_steps": m.takes_local_steps, "normalisers": m.takes_normalisers,
             "names": m.takes_names}
    extra = {n: v for n, v in per_client.items() if takes[n]}
    if not m.coordinatewise:
        if m.takes_extras:
            extra["extras"] = used_extras
        if m.takes_device:
            extra["device"] = dev
        if m.takes_theta0:
            extra["theta0"] = theta0
        if m.global_pass is not None:
            extra["stats"] = stats
        out = m.fn(task_vectors, p, **extra, **full_params)
        if m.personal:
            return out
        return {key: v.to("cpu") for key, v in out.items()}

    ref = task_vectors[0]
    if m.coefficients is not None:
        return linear_combination(task_vectors, m.coefficients(p, **extra, **full_params), dev)
    extra = {n: v.to(dev) if isinstance(v, torch.Tensor) else v for n, v in extra.items()}
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

