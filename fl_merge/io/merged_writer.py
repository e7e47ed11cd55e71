"""Writing a run's merged model, theta0 + eta * Delta, one tensor at a time.

theta0 and Delta are any name -> tensor mappings (memory-mapped ones too,
fl_merge/io/spill.py `MappedState`): each merged tensor is computed when the writer asks for
it, written, and let go, so writing costs one tensor of memory, never a merged state dict.
Files go through the one safetensors writer (`fl_merge.core.safetensors_writer`) and the
merge's output placement (`fl_merge.io.merge_output.write_output`): nothing half-written is
ever visible.

* `write_merged_model`: merged.safetensors in fl-merge's names (``backbone.*`` and each task's
  head under ``heads.<task>.*``, `fl_merge.load_merged` reads it); above `max_shard_bytes`
  Hugging Face style shards ``merged-00001-of-0000n.safetensors`` and
  ``merged.safetensors.index.json`` instead.
* `write_hf_model`: for an ``hf:<folder>`` model, a Hugging Face model folder (merged-hf/)
  that ``transformers.AutoModel.from_pretrained`` loads: the merged backbone under the source
  folder's own tensor names (fl-merge's ``backbone.encoder.`` / ``backbone.net.`` prefix
  replaced by the source's, `hf_names`), every source tensor the run's model does not hold
  (a CLIP pair's text tower, a causal LM's lm_head) copied as it is, model.safetensors or
  shards + index, and the source's config.json, tokenizer and generation files
  (`merge_output.model_files`). Where the installed transformers renames the file's tensors
  at load time, the run's tensors go under transformers' own module names instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fl_merge.core.safetensors_writer import DEFAULT_MAX_SHARD_BYTES, DTYPES, write_checkpoint
from fl_merge.core.task_vectors import MergeInputError
from fl_merge.io.checkpoints import Checkpoint
from fl_merge.io.client_checkpoints import CheckpointClientError, map_names
from fl_merge.io.merge_output import write_output
from fl_merge.io.results import merged_metadata
from fl_merge.models.assign import assign_tensor_

HF_PREFIX = "hf:"
HF_SUFFIX = "-hf"  # merged.safetensors -> merged-hf/, merged-ties.safetensors -> merged-ties-hf/

Tensors = Mapping[str, torch.Tensor]


def hf_folder_name(model_file: str) -> str:
    """The Hugging Face folder written beside a run's model file `model_file`."""
    return model_file.removesuffix(".safetensors") + HF_SUFFIX


def hf_model_folder(model: str) -> Path | None:
    """The local folder of an ``hf:`` model (its config, tokenizer and weights): the folder
    itself, or a hub id's snapshot in the local Hugging Face cache; None for any other model
    or a hub id not in the cache."""
    if not model.startswith(HF_PREFIX):
        return None
    from fl_merge.models.hf import hf_source

    src = hf_source(model, model[len(HF_PREFIX):])
    if src.local:
        return Path(src.ref)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src.ref, local_files_only=True))
    except Exception:  # noqa: BLE001 (not cached, or no huggingface_hub): no folder to copy
        return None


def check_delta(theta0: Tensors, delta: Tensors) -> None:
    """Delta's names are theta0's (apply_update's rule), before anything is written."""
    unknown = [k for k in delta if k not in theta0]
    if unknown:
        raise MergeInputError(f"update has parameters the base model lacks: {unknown[:5]}")


def merged_tensor(theta0: Tensors, delta: Tensors, key: str, eta: float) -> torch.Tensor:
    """theta0[key] + eta * Delta[key] in theta0's dtype (`apply_update`'s arithmetic, so the
    same numbers as the round's merged_state); theta0[key] where Delta lacks it. Computed
    block by block into the result (`fl_merge.models.assign.assign_tensor_`): besides the
    result, a block of float32, not a float32 copy and a clone of the tensor (measured on a
    1.25 GiB fp16 Llama: 625 MiB of anonymous memory above the start for its 125 MiB
    embeddings, benchmarks/theta0_memory.py)."""
    base = theta0[key]
    if key not in delta:
        return base
    out = torch.empty(base.shape, dtype=base.dtype)
    assign_tensor_(out, base, delta[key], eta)
    return out


def _spec(key: str, t: torch.Tensor) -> tuple[str, torch.dtype, tuple[int, ...]]:
    return key, t.dtype, tuple(t.shape)


def write_merged_model(path: str | os.PathLike, theta0: Tensors, delta: Tensors, eta: float,
                       heads: Mapping[str, Tensors], metadata: Mapping[str, Any],
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """merged.safetensors' format at `path` (module docstring): theta0 + eta * Delta under
    theta0's names and each task's head (``head.<p>`` -> ``heads.<task>.<p>``), names sorted,
    so the same tensors and metadata give the same bytes; shards + index above
    `max_shard_bytes`, an earlier output of either layout replaced. Returns the files."""
    meta = merged_metadata(metadata)  # a bad field is refused before anything is written
    check_delta(theta0, delta)
    head = {f"heads.{task}.{k.removeprefix('head.')}": v.detach().contiguous().cpu()
            for task, params in heads.items() for k, v in params.items()}
    clash = sorted(set(head) & set(theta0))
    if clash:
        raise MergeInputError(f"merged model: head names {clash[:3]} are also backbone names")
    keys = sorted({*theta0, *head})
    specs = [_spec(k, head[k] if k in head else theta0[k]) for k in keys]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for k in keys:
            yield k, head[k] if k in head else merged_tensor(theta0, delta, k, eta)

    return write_output(path, lambda p: write_checkpoint(p, specs, tensors(), max_shard_bytes, meta),
                        path)


def hf_names(source_keys: Sequence[str], theta0_keys: Sequence[str], merged_keys: Sequence[str],
             folder: Path) -> dict[str, str]:
    """run name -> the source folder's tensor name, under one prefix rewrite that finds every
    merged parameter (`client_checkpoints.map_names`, the rule checkpoint clients use); one
    MergeInputError line otherwise."""
    try:
        return map_names(list(source_keys), list(theta0_keys), list(merged_keys) or list(theta0_keys))
    except CheckpointClientError:
        missing = list(merged_keys or theta0_keys)[:2]
        raise MergeInputError(
            f"merged Hugging Face folder: the run's parameters ({', '.join(missing)}, ...) do not "
            f"map onto the tensor names of {folder} ({', '.join(list(source_keys)[:2])}, ...): "
            "give the hf: folder the run's model was built from") from None


def transformers_names(folder: Path) -> list[str]:
    """The state-dict names of transformers' AutoModel for `folder`'s config, as the installed
    transformers names its modules (built on the meta device: no weights are read or made)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(config)
    return list(model.state_dict())


def write_hf_model(out: str | os.PathLike, source: str | os.PathLike, theta0: Tensors, delta: Tensors,
                   eta: float, metadata: Mapping[str, Any],
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """The Hugging Face model folder `out` (module docstring) for the ``hf:`` model whose
    folder is `source`: built whole in a temporary sibling and renamed into place. The
    weights keep the source file's names and order, its tensors that the run does not hold
    copied; where the installed transformers renamed the file's names at load time (ViT in
    transformers 5: ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj``),
    the run's tensors alone under transformers' own names, which it loads as they are.
    config.json's dtype entry is set when the merged weights' dtype differs from the
    source's. Returns the files written."""
    meta = {"format": "pt", **merged_metadata(metadata)}  # transformers wants format=pt
    check_delta(theta0, delta)
    source = Path(source)
    with Checkpoint(source, f"hf: folder {source}", pickles=True) as ck:
        try:
            names = hf_names(ck.keys, list(theta0), list(delta), source)
            order = list(ck.keys)  # the source file's tensors, the run's among them
        except MergeInputError as e:
            try:
                names = hf_names(transformers_names(source), list(theta0), list(delta), source)
            except MergeInputError:
                raise e from None
            order = list(names.values())  # the run's tensors only
        run_of = {s: k for k, s in names.items()}
        specs = []
        for s in order:
            info = ck.info(s) if s in ck.keys else None
            if s not in run_of:
                specs.append((s, DTYPES[info.dtype], info.shape))
                continue
            spec = _spec(s, theta0[run_of[s]])
            if info is not None and spec[2] != info.shape:
                raise MergeInputError(f"merged Hugging Face folder: '{run_of[s]}' has shape "
                                      f"{list(spec[2])} but {source}'s '{s}' has {list(info.shape)}")
            specs.append(spec)
        written = {d for _, d, _ in specs if d.is_floating_point}
        stored = {DTYPES[ck.info(s).dtype] for s in ck.keys if ck.info(s).is_float}
        dtype = next(iter(written)) if len(written) == 1 and written != stored else None

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for s, _, _ in specs:
                yield s, merged_tensor(theta0, delta, run_of[s], eta) if s in run_of else ck.get(s)

        return write_output(out, lambda p: write_checkpoint(p, specs, tensors(), max_shard_bytes, meta),
                            source, dtype)
