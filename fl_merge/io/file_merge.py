"""Merge checkpoints on disk, tensor by tensor (the engine of `fl-merge merge`).

For each tensor name: read the base's tensor theta0 and the K models' tensors theta_i,
form tau_i = theta_i - theta0 in float32 (float64 stays float64), Delta = fl_merge.merge(
method, [{name: tau_i}], ...), write theta0 + eta * Delta in the base's dtype (or the one
asked for). Memory: K + 3 tensors of the largest size in float32 (a pass: K + 1), never a model.

Methods and their scope (`method_scope`), from their `register(...)` declarations:

* coordinate-wise methods, and whole-vector ones that declare per_tensor_exact (e.g.
  breadcrumbs, model_stock; dare unless base=ties trims): per tensor IS the method;
* ones that declare a global pass (TIES at its default convention, Krum, Multi-Krum, CClip,
  the geometric median, PCB, DARE-TIES, hetero): the pass runs once over the task vectors
  streamed from the files (fl_merge/io/file_passes.py), then each tensor with its stats: exact;
* other whole-vector methods (none built in: a user's that declares neither) run on each
  tensor alone: a per-tensor (layer-wise) variant;
* methods needing per-model arrays that checkpoints do not carry (`Needs.extras`, e.g.
  fisher's diagonal Fisher, regmean's Gram matrices) take them from one safetensors file per
  model and array (`extras={"gram": [F1, ..., FK]}`, `--extras gram=F1,...,FK`), keyed by the
  base's tensor names: a DIAGONAL array holds every float tensor of the base with its shape, a
  GRAM one a [d_in, d_in] matrix for some 2-D tensors [d_out, d_in] (the same ones in every
  file); without them such a method is refused.

Non-float tensors (BatchNorm's num_batches_tracked, int buffers) are never merged: they are
copied from the base when every model holds the same values, and otherwise the merge stops
naming the tensor (or copies the base's anyway with non_float="base").

LiNeS (`lines=`, fl_merge/merging/lines.py): tensor `key` is written with eta * scale(key),
scale(l) = alpha + beta (l - 1) / (L - 1) from the layer index in its name; eta =
eta_for_lambda(method, 1, K) is the paper's LiNeS (the CLI passes it). alpha must be a
number: "auto" needs the whole merged vector's l1 norm, not known tensor by tensor.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fl_merge.merging.lines import check_lines, layer_scales
from fl_merge.merging.passes import has_global_pass
from fl_merge.merging.registry import (GRAM, check_method_params, check_model_fits, extra_layouts,
                                       is_per_tensor_exact, local_steps_tensor, normalisers_tensor,
                                       normalized_weights)
from fl_merge.methods import get_method, merge
from fl_merge.merging.streaming import work_dtype
from fl_merge.core.safetensors_writer import DEFAULT_MAX_SHARD_BYTES, DTYPES, write_checkpoint
from fl_merge.io.checkpoints import Checkpoint
from fl_merge.io.file_passes import file_pass, task_vector_of
from fl_merge.io.merge_output import check_output, write_output
from fl_merge.merging.scales import check_eta
from fl_merge.core.task_vectors import MergeInputError

NON_FLOAT_POLICIES = ("agree", "base")
# Elements per chunk of the linear path: 32K float32 = 128 KiB per buffer, so the chunk's
# buffers stay in cache, and below torch's parallel grain (no thread hand-offs per chunk).
CHUNK = 1 << 15


def method_scope(method: str, params: dict | None = None, extras: Sequence[str] = ()) -> str:
    """'exact' (per tensor, or per tensor after its declared pass, is the method), 'per-tensor'
    (a layer-wise variant of a whole-vector method) or 'refused: <why>' for `method` with
    `params`, given files of the per-model arrays named in `extras`."""
    m = get_method(method)
    if m.personal:
        return ("refused: it gives each model its own merged model (one shared vector, a mask and "
                "a scale per model), which one output file cannot hold (use fl_merge.merge(...)"
                ".model(theta0, i) or a Flower run, which writes one file per task)")
    lacking = [n for n in m.needs.extras if n not in extras]
    if lacking:
        return (f"refused: needs per-model {', '.join(lacking)} arrays, which checkpoints do not "
                f"carry: give one safetensors file per model, --extras {lacking[0]}=F1,...,FK")
    exact = is_per_tensor_exact(method, params) or has_global_pass(method, params)
    return "exact" if exact else "per-tensor"


def check_merge_inputs(method: str, params: dict, num_models: int, weights=None, local_steps=None,
                       normalisers=None, names=None, extras: Sequence[str] = ()) -> None:
    """Every merge argument checked before a file is read: the method is usable on files
    (given files of the `extras` it needs), its parameters, the per-model weights / steps /
    normalisers, and the model count (by a merge of one zero coordinate per model, which runs
    fl_merge.merge's own validation)."""
    scope = method_scope(method, params, extras)
    if scope.startswith("refused"):
        raise MergeInputError(f"merge method '{method}' cannot merge checkpoint files: {scope[9:]}")
    check_method_params(method, params, num_models)
    m = get_method(method)
    if (m.needs.normalisers or m.needs.local_steps) and local_steps is None and normalisers is None:
        raise MergeInputError(
            f"merge method '{method}' needs each model's local step count: pass --local-steps "
            f"N1 ... N{num_models} (or --normalisers a1 ... a{num_models}, FedNova's a_i)")
    unused = sorted(set(extras) - set(m.needs.extras))
    if unused:
        raise MergeInputError(f"merge method '{method}' uses no per-model {unused[0]} arrays "
                              f"(it needs: {', '.join(m.needs.extras) or 'none'})")
    shape = (1, 1) if m.needs.extras else (1,)  # 1 x 1: a weight a GRAM array fits
    probe = [{"probe": torch.zeros(shape)} for _ in range(num_models)]
    base = {"probe": torch.zeros(shape)} if m.takes_theta0 else None
    given = {n: [{"probe": torch.ones(shape)} for _ in range(num_models)] for n in m.needs.extras}
    merge(method, probe, weights, local_steps, normalisers=normalisers, names=names, theta0=base,
          extras=given or None, **params)


def open_extras(extras: Mapping[str, Sequence[str | os.PathLike]], base: Checkpoint,
                num_models: int, method: str) -> dict[str, list[Checkpoint]]:
    """name -> one opened file per model, checked against the base by the array's layout
    (shapes only: values are checked per tensor by fl_merge.merge before anything is written
    to the output's final place)."""
    layouts = extra_layouts()
    out: dict[str, list[Checkpoint]] = {}
    try:
        for name, files in extras.items():
            files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
            if len(files) != num_models:
                raise MergeInputError(f"--extras {name}: {len(files)} file(s) for {num_models} models "
                                      "(one per model, in the models' order)")
            cks = out[name] = [Checkpoint(f, f"{name} file {f}") for f in files]
            gram = layouts[name] == GRAM
            for ck in cks:
                if gram and set(ck.keys) != set(cks[0].keys):
                    raise MergeInputError(f"{ck.role} covers other tensors than {cks[0].role}")
                want = set(ck.keys) if gram else {k for k in base.keys if base.info(k).is_float}
                for key in sorted(want):
                    if key not in base.keys or key not in ck.keys:
                        raise MergeInputError(f"{ck.role} {'has' if gram else 'lacks'} tensor '{key}'"
                                              f"{', which the base lacks' if gram else ''}")
                    b = tuple(base.info(key).shape)
                    if gram and len(b) != 2:
                        raise MergeInputError(f"{ck.role}: tensor '{key}' is {list(b)} in the base, "
                                              "not a 2-D weight [d_out, d_in]")
                    shape = (b[1], b[1]) if gram else b
                    if tuple(ck.info(key).shape) != shape:
                        raise MergeInputError(f"{ck.role}: tensor '{key}' has shape "
                                              f"{list(ck.info(key).shape)}, the base's {list(b)} "
                                              f"needs {list(shape)}")
            if gram and not cks[0].keys:
                raise MergeInputError(f"--extras {name}: the files hold no matrix ({method} needs a "
                                      "[d_in, d_in] one for some 2-D tensor [d_out, d_in])")
    except MergeInputError:
        for cks in out.values():
            for ck in cks:
                ck.close()
        raise
    return out


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


def merge_tensor(method: str, key: str, theta0: torch.Tensor, thetas: Iterable[torch.Tensor],
                 eta: float, out_dtype: torch.dtype, params: dict, **per_model) -> torch.Tensor:
    """theta0 + eta * merge(method, [{key: theta_i - theta0}]) for one tensor, computed in
    float32 (float64 when the base is) and cast to `out_dtype`; `per_model`: weights,
    local_steps, normalisers, names for fl_merge.merge. `thetas` is iterated once (a
    generator reading the files keeps one model's tensor in its file dtype at a time)."""
    work = work_dtype(theta0.dtype)
    base = theta0.to(work)
    taus = [{key: task_vector_of(t, base, work)} for t in thetas]
    weights, steps = per_model.pop("weights", None), per_model.pop("local_steps", None)
    if get_method(method).takes_theta0:  # slerp, karcher: defined on the models themselves
        per_model["theta0"] = {key: base}
    del base  # a float32 copy of an fp16 base is made again below: not held while merging
    delta = merge(method, taus, weights, steps, **per_model, **params)[key]
    del taus
    out = theta0.to(work)
    out = out.add_(delta, alpha=eta) if out is not theta0 else out.add(delta, alpha=eta)
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


def model_names(models: Sequence[str | os.PathLike]) -> list[str]:
    """Each model's name for the merge (the key of its random masks, e.g. dare's, and its
    label in errors): its path relative to the folder holding all of them (a lone model: its
    file or folder name), so the merge does not change when the set of files moves or is
    named by relative instead of absolute paths."""
    paths = [Path(m).resolve() for m in models]
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(os.path.commonpath(paths))
    names = [str(p.relative_to(common)) for p in paths]
    if len(set(names)) != len(names) or "." in names:
        raise MergeInputError(f"model {models[names.index('.')] if '.' in names else models[0]} "
                              "is given twice")
    return names


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
    lines: Mapping[str, Any] | None = None,
    extras: Mapping[str, Sequence[str | os.PathLike]] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Merge checkpoint files into `out` (see the module docstring; a folder `out` is a
    Hugging Face model folder with the base's config and tokenizer, fl_merge/io/merge_output.py);
    returns the files written. `extras`: per-model array files, name -> one file per model.
    Every input is checked before anything is written; an existing output is refused unless
    `overwrite`, and replaced whole."""
    params = dict(params or {})
    eta = check_eta(eta)
    if lines is not None:
        lines = check_lines(lines, allow_auto=False)
    if not models:
        raise MergeInputError("no models to merge: give at least one checkpoint besides the base")
    given = [str(m) for m in models]
    if len(set(given)) != len(given):
        raise MergeInputError(f"model {next(n for i, n in enumerate(given) if n in given[:i])} "
                              "is given twice")
    names = model_names(models)
    extras = dict(extras or {})
    check_merge_inputs(method, params, len(models), weights, local_steps, normalisers, names,
                       list(extras))
    extra_files = [f for fs in extras.values() for f in ([fs] if isinstance(fs, (str, os.PathLike)) else fs)]
    check_output(out, overwrite, [base, *models, *extra_files])
    if dtype is not None and not dtype.is_floating_point:
        raise MergeInputError(f"dtype must be a floating-point type, got {dtype}")
    base_ck = Checkpoint(base, "base")
    cks = [Checkpoint(m, f"model {m}") for m in models]
    stats: dict[str, list[Checkpoint]] = {}
    try:
        check_model_fits(method, {k: tuple(base_ck.info(k).shape) for k in base_ck.keys
                                  if base_ck.info(k).is_float})
        stats = open_extras(extras, base_ck, len(cks), method)
        return _merge_open(base_ck, cks, method, eta, out, params, dtype, max_shard_bytes,
                           non_float, weights, local_steps, normalisers, names, stats, lines)
    finally:
        for ck in (base_ck, *cks, *(c for files in stats.values() for c in files)):
            ck.close()


def _merge_open(base_ck, cks, method, eta, out, params, dtype, max_shard_bytes, non_float,
                weights, local_steps, normalisers, names, stats, lines=None) -> list[Path]:
    specs = plan(base_ck, cks, dtype)
    floats = [k for k, _, _ in specs if base_ck.info(k).is_float]  # the tensors merged
    scale = {}  # LiNeS: eta * scale(key) per float tensor
    if lines is not None:
        scale = layer_scales(floats, lines["alpha"], lines["beta"], lines["pattern"])
    check_non_float(base_ck, cks, non_float)
    per_model = {"weights": weights, "local_steps": local_steps, "normalisers": normalisers,
                 "names": names}

    def extras_of(key: str) -> dict:
        return {"extras": {n: [{key: c.get(key)} if key in c.keys else {} for c in files]
                           for n, files in stats.items()}} if stats else {}
    with warnings.catch_warnings():  # check_merge_inputs' probe showed them once
        warnings.simplefilter("ignore", UserWarning)
        coefs = linear_coefficients(method, params, len(cks), weights, local_steps, normalisers)
        # a declared pass (ties, krum, ...): once over the whole update, before any writing
        per_model["stats"] = file_pass(method, params, base_ck, cks, floats, weights, names)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, out_dtype, _ in specs:
            if not base_ck.info(key).is_float:
                yield key, base_ck.get(key)
                continue
            eta_key = eta * scale.get(key, 1.0)
            if coefs is not None:  # linear method: chunked straight from the files
                yield key, linear_tensor(base_ck, cks, key, [eta_key * c for c in coefs], out_dtype)
                continue
            theta0 = base_ck.get(key)
            # read one model at a time: merge_tensor turns each into its float32 task vector
            # and lets the file's tensor go before the next is read
            thetas = (c.get(key) for c in cks)
            with warnings.catch_warnings():  # check_merge_inputs' probe showed them once
                warnings.simplefilter("ignore", UserWarning)
                merged = merge_tensor(method, key, theta0, thetas, eta_key, out_dtype, params,
                                      **per_model, **extras_of(key))
            del thetas
            yield key, merged
            del merged, theta0  # before the next tensor is read: peak stays one tensor's worth

    meta = {"format": "pt", "merged_by": "fl-merge merge", "method": method, "eta": repr(eta)}
    if lines is not None:
        meta["lines"] = repr({k: lines[k] for k in ("alpha", "beta", "pattern")})
    return write_output(out, lambda path: write_checkpoint(path, specs, tensors(), max_shard_bytes, meta),
                        base_ck.path, dtype)
