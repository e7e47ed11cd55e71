"""Merge checkpoints on disk, tensor by tensor (the engine of `fl-merge merge`).

For each tensor name: read the base's tensor theta0 and the K models' tensors theta_i,
form tau_i = theta_i - theta0 in float32 (float64 stays float64), Delta = fl_merge.merge(
method, [{name: tau_i}], ...), and write theta0 + eta * Delta in the base's dtype (or the
one asked for). Memory: K + 3 tensors of the largest size in float32, never a model.

Methods and the per-tensor scope (`method_scope`), from what each method declares in its
file (`register(..., per_tensor_exact=..., needs=...)`):

* coordinate-wise methods, and whole-vector ones that declare per_tensor_exact (e.g.
  breadcrumbs and model_stock, per tensor by definition; dare unless base=ties trims):
  per tensor IS the method, exactly;
* the other whole-vector methods (top-k thresholds, norms, distances, cosines over the
  whole update) run on each tensor alone: a per-tensor (layer-wise) variant of the method,
  as mergekit runs TIES;
* methods needing per-model arrays that checkpoints do not carry (`Needs.extras`, e.g.
  fisher) are refused.

Non-float tensors (BatchNorm's num_batches_tracked, int buffers) are never merged: they are
copied from the base when every model holds the same values, and otherwise the merge stops
naming the tensor (or copies the base's anyway with non_float="base").
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from fl_merge.merging.registry import check_method_params, is_per_tensor_exact, normalized_weights
from fl_merge.methods import get_method, merge
from fl_merge.merging.streaming import work_dtype
from fl_merge.merging.registry import local_steps_tensor, normalisers_tensor
from fl_merge.core.safetensors_writer import DEFAULT_MAX_SHARD_BYTES, DTYPES, write_checkpoint
from fl_merge.io.checkpoints import Checkpoint
from fl_merge.core.task_vectors import MergeInputError

NON_FLOAT_POLICIES = ("agree", "base")
# Elements per chunk of the linear path: 32K float32 = 128 KiB per buffer, so the chunk's
# buffers stay in cache, and below torch's parallel grain (no thread hand-offs per chunk).
CHUNK = 1 << 15


def method_scope(method: str, params: dict | None = None) -> str:
    """'exact' (per tensor is the method), 'per-tensor' (a layer-wise variant of a
    whole-vector method) or 'refused: <why>' for `method` with `params`."""
    m = get_method(method)
    if m.personal:
        return ("refused: it gives each model its own merged model (one shared vector, a mask and "
                "a scale per model), which one output file cannot hold (use fl_merge.merge(...)"
                ".model(theta0, i) or a Flower run, which writes one file per task)")
    if m.needs.extras:
        return (f"refused: needs per-model {', '.join(m.needs.extras)} arrays, which "
                "checkpoints do not carry (use fl_merge.merge(..., extras=...) or a Flower round)")
    return "exact" if is_per_tensor_exact(method, params) else "per-tensor"


def check_merge_inputs(method: str, params: dict, num_models: int,
                       weights=None, local_steps=None, normalisers=None, names=None) -> None:
    """Every merge argument checked before a file is read: the method is usable on files,
    its parameters, the per-model weights / steps / normalisers, and the model count (by a
    merge of one zero coordinate per model, which runs fl_merge.merge's own validation)."""
    scope = method_scope(method, params)
    if scope.startswith("refused"):
        raise MergeInputError(f"merge method '{method}' cannot merge checkpoint files: {scope[9:]}")
    check_method_params(method, params, num_models)
    m = get_method(method)
    if (m.needs.normalisers or m.needs.local_steps) and local_steps is None and normalisers is None:
        raise MergeInputError(
            f"merge method '{method}' needs each model's local step count: pass --local-steps "
            f"N1 ... N{num_models} (or --normalisers a1 ... a{num_models}, FedNova's a_i)")
    probe = [{"probe": torch.zeros(1)} for _ in range(num_models)]
    merge(method, probe, weights, local_steps, normalisers=normalisers, names=names, **params)


def plan(base: Checkpoint, models: Sequence[Checkpoint], dtype: torch.dtype | None
         ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Output (key, dtype, shape) per tensor, in the base's order, after checking that every
    model has the base's tensors with its shapes, and the same dtype for non-float ones."""
    keys = set(base.keys)
    for m in models:
        if set(m.keys) != keys:
            extra, missing = sorted(set(m.keys) - keys), sorted(keys - set(m.keys))
            what = (f"lacks tensor '{missing[0]}'" if missing else f"has tensor '{extra[0]}'")
            raise MergeInputError(f"{m.role} {what}, the base {'has' if missing else 'lacks'} it "
                                  f"({len(missing)} missing, {len(extra)} extra); all checkpoints "
                                  "must hold the same tensors")
    specs = []
    for key in base.keys:
        b = base.info(key)
        if b.dtype not in DTYPES:
            raise MergeInputError(f"base: tensor '{key}' has dtype {b.dtype}, which fl-merge "
                                  f"cannot handle (known: {', '.join(DTYPES)})")
        for m in models:
            i = m.info(key)
            if i.shape != b.shape:
                raise MergeInputError(f"tensor '{key}' has shape {list(i.shape)} in {m.role} "
                                      f"but {list(b.shape)} in the base")
            if i.is_float != b.is_float or (not b.is_float and i.dtype != b.dtype):
                raise MergeInputError(f"tensor '{key}' is {i.dtype} in {m.role} but {b.dtype} "
                                      "in the base")
        out = dtype if (dtype is not None and b.is_float) else DTYPES[b.dtype]
        specs.append((key, out, b.shape))
    return specs


def check_non_float(base: Checkpoint, models: Sequence[Checkpoint], policy: str = "agree") -> None:
    """Non-float tensors must hold the base's values in every model (policy 'agree'); with
    'base' the base's values are kept regardless."""
    if policy not in NON_FLOAT_POLICIES:
        raise MergeInputError(f"non_float must be one of {NON_FLOAT_POLICIES}, got {policy!r}")
    if policy == "base":
        return
    for key in base.keys:
        if base.info(key).is_float:
            continue
        ref = base.get(key)
        for m in models:
            if not torch.equal(m.get(key), ref):
                raise MergeInputError(
                    f"non-float tensor '{key}' differs between the base and {m.role}; it cannot "
                    "be averaged: make the checkpoints agree, or keep the base's values with "
                    "--non-float base")


def merge_tensor(method: str, key: str, theta0: torch.Tensor, thetas: Sequence[torch.Tensor],
                 eta: float, out_dtype: torch.dtype, params: dict, **per_model) -> torch.Tensor:
    """theta0 + eta * merge(method, [{key: theta_i - theta0}]) for one tensor, computed in
    float32 (float64 when the base is) and cast to `out_dtype`; `per_model`: weights,
    local_steps, normalisers, names for fl_merge.merge."""
    work = work_dtype(theta0.dtype)
    base = theta0.to(work)
    taus = [{key: t.to(work).sub_(base) if t.dtype != work else t.sub(base)} for t in thetas]
    weights, steps = per_model.pop("weights", None), per_model.pop("local_steps", None)
    delta = merge(method, taus, weights, steps, **per_model, **params)[key]
    del taus
    out = base.add_(delta, alpha=eta) if base is not theta0 else base.add(delta, alpha=eta)
    out = out.to(out_dtype)
    if out.dtype.is_floating_point and out.numel() and not bool(torch.isfinite(out).all()):
        raise MergeInputError(f"merged tensor '{key}' overflows {out_dtype}: use a smaller "
                              "lambda/eta or --dtype float32")
    return out


def linear_coefficients(method: str, params: dict, num_models: int, weights=None,
                        local_steps=None, normalisers=None) -> list[float] | None:
    """c_i with Delta = sum_i c_i tau_i for a linear method (one that registers
    `coefficients`: fedavg/task_arithmetic, fednova), else None. The same for every tensor."""
    m = get_method(method)
    if m.coefficients is None:
        return None
    steps = local_steps_tensor(local_steps, num_models)
    extra = {}
    if m.takes_local_steps:
        extra["local_steps"] = steps
    if m.takes_normalisers:
        extra["normalisers"] = normalisers_tensor(normalisers, steps, num_models, None)
    p = normalized_weights(weights, num_models)
    return [float(c) for c in m.coefficients(p, **extra, **check_method_params(method, params))]


def linear_tensor(base: Checkpoint, models: Sequence[Checkpoint], key: str, scales: Sequence[float],
                  out_dtype: torch.dtype, chunk: int = CHUNK) -> torch.Tensor:
    """theta0 + sum_i scales_i (theta_i - theta0) for tensor `key` (scales_i = eta c_i),
    streamed from the files in chunks: each chunk of every input is read into a small
    buffer, turned into float32 (float64 for a float64 base) there, combined and written into
    the output tensor, so the inputs are never whole in memory and the arithmetic runs in
    cache (same formula as merge_tensor, one pass over the files)."""
    info = base.info(key)
    work = work_dtype(DTYPES[info.dtype])
    n = 1
    for d in info.shape:
        n *= d
    out = torch.empty(n, dtype=out_dtype)
    m = max(1, min(chunk, n))
    stage = [torch.empty(m, dtype=DTYPES[c.info(key).dtype]) for c in (base, *models)]
    views = [memoryview(st.view(torch.uint8).numpy()) for st in stage]
    sizes = [st.element_size() for st in stage]
    b, acc, tmp = (torch.empty(m, dtype=work) for _ in range(3))
    fmax = torch.finfo(out_dtype).max
    for s in range(0, n, m):
        e = min(n, s + m)
        k = e - s
        bb, a, t = b[:k], acc[:k], tmp[:k]
        base.read_into(key, s, views[0][: k * sizes[0]])
        bb.copy_(stage[0][:k])
        for i, (ck, scale) in enumerate(zip(models, scales), 1):
            ck.read_into(key, s, views[i][: k * sizes[i]])
            t.copy_(stage[i][:k])
            t.sub_(bb)
            if i == 1:  # the first model: a = theta0 + scale * tau, no separate copy
                torch.add(bb, t, alpha=scale, out=a)
            else:
                a.add_(t, alpha=scale)
        lo, hi = torch.aminmax(a)  # NaN propagates into both
        if not -fmax <= float(lo) <= float(hi) <= fmax:
            raise MergeInputError(f"merged tensor '{key}' is not finite in {out_dtype} (an input "
                                  "holds NaN/Inf, or it overflows: use a smaller lambda/eta or "
                                  "--dtype float32)")
        out[s:e].copy_(a)
    return out.reshape(info.shape)


def merge_files(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    method: str,
    eta: float,
    out: str | os.PathLike,
    params: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    non_float: str = "agree",
    weights: Sequence[float] | None = None,
    local_steps: Sequence[float] | None = None,
    normalisers: Sequence[float] | None = None,
) -> list[Path]:
    """Merge checkpoint files into `out` (see the module docstring); returns the files
    written. Every input is checked before anything is written; the output is atomic."""
    params = dict(params or {})
    if not models:
        raise MergeInputError("no models to merge: give at least one checkpoint besides the base")
    names = [str(m) for m in models]
    if len(set(names)) != len(names):
        raise MergeInputError(f"model {next(n for i, n in enumerate(names) if n in names[:i])} "
                              "is given twice")
    check_merge_inputs(method, params, len(models), weights, local_steps, normalisers, names)
    if dtype is not None and not dtype.is_floating_point:
        raise MergeInputError(f"dtype must be a floating-point type, got {dtype}")
    base_ck = Checkpoint(base, "base")
    cks = [Checkpoint(m, f"model {m}") for m in models]
    try:
        return _merge_open(base_ck, cks, method, eta, out, params, dtype, max_shard_bytes,
                           non_float, weights, local_steps, normalisers, names)
    finally:
        for ck in (base_ck, *cks):
            ck.close()


def _merge_open(base_ck, cks, method, eta, out, params, dtype, max_shard_bytes, non_float,
                weights, local_steps, normalisers, names) -> list[Path]:
    specs = plan(base_ck, cks, dtype)
    check_non_float(base_ck, cks, non_float)
    per_model = {"weights": weights, "local_steps": local_steps, "normalisers": normalisers,
                 "names": names}
    with warnings.catch_warnings():  # check_merge_inputs' probe showed them once
        warnings.simplefilter("ignore", UserWarning)
        coefs = linear_coefficients(method, params, len(cks), weights, local_steps, normalisers)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, out_dtype, _ in specs:
            if not base_ck.info(key).is_float:
                yield key, base_ck.get(key)
                continue
            if coefs is not None:  # linear method: chunked straight from the files
                yield key, linear_tensor(base_ck, cks, key, [eta * c for c in coefs], out_dtype)
                continue
            theta0 = base_ck.get(key)
            thetas = [c.get(key) for c in cks]
            with warnings.catch_warnings():  # check_merge_inputs' probe showed them once
                warnings.simplefilter("ignore", UserWarning)
                merged = merge_tensor(method, key, theta0, thetas, eta, out_dtype, params,
                                      **per_model)
            del thetas
            yield key, merged
            del merged, theta0  # before the next tensor is read: peak stays one tensor's worth

    meta = {"format": "pt", "merged_by": "fl-merge merge", "method": method, "eta": repr(eta)}
    return write_checkpoint(out, specs, tensors(), max_shard_bytes, meta)
