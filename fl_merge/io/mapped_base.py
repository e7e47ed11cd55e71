"""theta0 memory-mapped from its source's own safetensors files, for a large-model round.

A round that spills or chunks (run-config spill, chunk-mib) keeps theta0 in memory-mapped
files (fl_merge/io/spill.py `MappedState`), so the ServerApp holds no copy of it between
messages. Where theta0 is a checkpoint's own tensors, the source's files already are such
files: `SourceState` maps each tensor where it lies (zero copy, `MappedState`'s reader:
copy-on-write, nothing written back; over files it holds open, `HeldFile`, so a later write
over the same path cannot change theta0), so theta0 never exists whole in the ServerApp's
memory, not even while it is loaded, and the round keeps it as it is (no copy into its store).

* `mapped_checkpoint`: a base-checkpoint in safetensors (a file, shards + index, a Hugging
  Face folder): every tensor under its own name, in the reader's order, as
  `fl_merge.round.base.load_checkpoint` reads them. None for a torch pickle.
* `mapped_hf_backbone`: an ``hf:<local folder>`` model's theta0 as the transformers path
  gives it (`fl_merge.models.registry.pretrained_backbone`: AutoModel.from_pretrained, wrapped,
  names under ``backbone.``): the names, order, shapes and dtypes of that backbone built on
  the ``meta`` device (no weights), each name mapped onto the folder's tensor by the one
  prefix rewrite merged-hf/ and checkpoint clients use (`client_checkpoints.map_names`).
  Only where the folder's bytes are what transformers would load (bit for bit): every name
  found, same shape, same dtype (no cast), no tied weights, no modules kept in float32, no
  quantisation, and transformers' load-time conversions for the model are renamings only
  (a converter that splits, fuses or permutes tensors changes values). Else None and the
  reason: the caller loads through transformers as before.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fl_merge.core.safetensors_writer import DTYPES
from fl_merge.core.task_vectors import MergeInputError
from fl_merge.io.checkpoints import Checkpoint
from fl_merge.io.client_checkpoints import CheckpointClientError, map_names
from fl_merge.io.spill import MappedState

HF_PREFIX = "hf:"
# transformers' load-time weight transforms that only rename (transformers 5
# core_model_loading); any other (WeightConverter: chunk, fuse, permute) changes values.
RENAMINGS = ("WeightRenaming", "PrefixChange")


class HeldFile(MappedState):
    """A `MappedState` over a file it holds open: what it maps stays the file it opened
    even when the path is replaced later (an atomic writer's rename, e.g. a run writing
    merged.safetensors over the one its base-checkpoint names)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 (closed with this object)
        super().__init__(path)

    def _map(self, length: int, offset: int) -> mmap.mmap:
        return mmap.mmap(self._fh.fileno(), length, access=mmap.ACCESS_COPY, offset=offset)

    def __del__(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()


class SourceState(Mapping[str, torch.Tensor]):
    """name -> tensor, each memory-mapped from (file, name in that file) when looked up
    (`HeldFile`: zero copy, unmapped when the tensor is freed); names in `where`'s order."""

    def __init__(self, where: Mapping[str, tuple[Path, str]]) -> None:
        files = {f: HeldFile(f) for f in dict.fromkeys(f for f, _ in where.values())}
        self._where = {k: (files[f], s) for k, (f, s) in where.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        state, name = self._where[key]
        return state[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, key: object) -> bool:  # without mapping the tensor
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        files = sorted({str(s.path) for s, _ in self._where.values()})
        return f"SourceState({len(self)} tensors from {files[:2]}{' ...' if len(files) > 2 else ''})"


def _mappable(ck: Checkpoint, keys: list[str]) -> bool:
    """Every key in a safetensors file of a dtype `MappedState` reads."""
    return all(ck.file_of(k) is not None and ck.info(k).dtype in DTYPES for k in keys)


def mapped_checkpoint(ck: Checkpoint) -> SourceState | None:
    """An open checkpoint's tensors under their own names, in its order, memory-mapped; None
    for a torch pickle (held in memory by the reader) or a dtype the mapper cannot read."""
    if not _mappable(ck, ck.keys):
        return None
    return SourceState({k: (ck.file_of(k), k) for k in ck.keys})


def meta_backbone(model: str) -> dict[str, torch.Tensor]:
    """The registered model's backbone state as `pretrained_backbone` names it
    (``backbone.``-prefixed), as ``meta`` tensors in the module's own parameter objects
    (two names of one tied parameter share one tensor): built from its config, no weights."""
    from fl_merge.models.registry import MERGED_PREFIX, get_model_spec

    with torch.device("meta"):
        backbone = get_model_spec(model).build_backbone()
    return {f"{MERGED_PREFIX}{k}": v for k, v in backbone.state_dict(keep_vars=True).items()}


def load_time_changes(folder: str) -> str | None:
    """Why transformers' from_pretrained of `folder` may give other values than its file
    holds (quantised, modules kept in float32, a converting load-time transform); None when
    it loads the file's tensors as they are (up to renaming)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "quantization_config", None):
        return "the model is quantised"
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(config)
    for m in model.modules():
        kept = getattr(m, "_keep_in_fp32_modules", None) or getattr(m, "_keep_in_fp32_modules_strict", None)
        if isinstance(m, transformers.PreTrainedModel) and kept:
            return f"{type(m).__name__} keeps modules in float32"
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers 4: no load-time conversions beyond legacy renames
        return None
    odd = sorted({type(t).__name__ for t in get_model_conversion_mapping(model)} - set(RENAMINGS))
    return f"transformers converts its tensors at load time ({', '.join(odd)})" if odd else None


def mapped_hf_backbone(model: str) -> tuple[SourceState | None, str]:
    """(theta0 of the ``hf:<local folder>`` `model`, memory-mapped from the folder's own
    safetensors files, and where from) when that is bit for bit what the transformers path
    gives (module docstring); else (None, why not). Never raises: whatever fails here (a
    missing package or folder, a model that cannot be built on the meta device) is left to
    the transformers path, which says it as it always did."""
    if not model.startswith(HF_PREFIX):
        return None, f"{model} is not an hf: model"
    try:
        return _map_hf(model)
    except Exception as e:  # noqa: BLE001 (the caller loads through transformers instead)
        first = (str(e).strip().splitlines() or [""])[0]
        return None, f"it could not be mapped ({type(e).__name__}: {first})"


def _map_hf(model: str) -> tuple[SourceState | None, str]:
    from fl_merge.models.hf import hf_source

    src = hf_source(model, model[len(HF_PREFIX):])
    if not src.local:
        return None, f"{src.ref} is a hub id, not a local folder"
    try:
        ck = Checkpoint(Path(src.ref), f"hf: folder {src.ref}")  # safetensors only
    except MergeInputError as e:
        return None, str(e)
    with ck:
        why = load_time_changes(src.ref)
        if why is not None:
            return None, why
        layout = meta_backbone(model)
        if len({id(v) for v in layout.values()}) < len(layout):
            return None, "the model ties weights"
        try:
            names = map_names(ck.keys, list(layout), list(layout), f"hf: folder {src.ref}")
        except CheckpointClientError:
            return None, "its names are not the folder's tensor names up to one prefix"
        for k, v in layout.items():
            info = ck.info(names[k]) if k in names else None
            if info is None or info.shape != tuple(v.shape) or DTYPES.get(info.dtype) != v.dtype:
                return None, f"'{k}' is not the folder's tensor as it is (name, shape or dtype)"
        if not _mappable(ck, [names[k] for k in layout]):
            return None, "its files hold a dtype the memory map cannot read"
        return SourceState({k: (ck.file_of(names[k]), names[k]) for k in layout}), \
            f"memory-mapped from {src.ref}'s safetensors files"
