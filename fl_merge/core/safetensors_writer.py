"""The one safetensors writer: every safetensors file fl-merge writes goes through
`write_checkpoint` (merged checkpoints of `fl-merge merge`, spilled updates, a run's merged
model and predictions, the client-update cache, the pretrained base cache); `save_tensors`
is its one-file form for a dict of tensors in memory.

safetensors' `save_file` needs every tensor of a file in memory at once. The format
is a little-endian u64 header length, a JSON header (dtype, shape, byte offsets per tensor,
padded with spaces to 8 bytes) and the raw bytes (https://github.com/huggingface/safetensors,
"Format"). Since the output's dtypes and shapes are known before any tensor is computed,
`write_checkpoint` writes the header first and then each tensor as it is produced, so
writing costs one tensor of memory (as reading does, `fl_merge.io.checkpoints`). Shards and the index follow Hugging Face's layout
(``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json`` with
``metadata.total_size`` and ``weight_map``). Every file is written under a temporary name
and renamed only when all shards are complete (the index last): a failure leaves nothing.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from fl_merge.core.files import atomic_write_text, remove_stale_temps, sync_directory, temp_path

HF_WEIGHTS = "model.safetensors"
# Hugging Face's save_pretrained default max_shard_size.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
ONE_FILE = 1 << 62  # a max_shard_bytes no model reaches: one file, never shards

# safetensors dtype names <-> torch dtypes (the format's "dtype" field).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


def plan_shards(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group keys, in order, into shards of at most `max_bytes` (a larger tensor gets a
    shard of its own), as Hugging Face's shard splitting does."""
    shards: list[list[str]] = []
    used = 0
    for key, size in sizes:
        if not shards or used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards or [[]]


def output_paths(out: str | os.PathLike, num_shards: int) -> tuple[list[Path], Path | None]:
    """Shard files and index for `out`: ``X.safetensors`` -> itself when one shard, else
    ``X-0000i-of-0000n.safetensors`` + ``X.safetensors.index.json`` beside it; any other
    `out` is a folder receiving model.safetensors (or its shards and index)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / HF_WEIGHTS
    if num_shards == 1:
        return [out], None
    stem = out.name[: -len(".safetensors")]
    shards = [out.with_name(f"{stem}-{i:05d}-of-{num_shards:05d}.safetensors")
              for i in range(1, num_shards + 1)]
    return shards, out.with_name(out.name + ".index.json")


def header_bytes(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (length prefix + padded JSON) for tensors in `specs` order."""
    head: dict[str, object] = {}
    if metadata:
        head["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, dtype, shape in specs:
        size = nbytes(dtype, shape)
        head[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(head, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_checkpoint(
    out: str | os.PathLike,
    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write the tensors that `tensors` yields (in `specs` order, with the dtype and shape
    `specs` announces) as one safetensors file or Hugging Face shards + index at `out`
    (`output_paths`), streaming: one tensor in memory at a time. Atomic as a whole: files
    appear only after every tensor was written. Returns the files written (index last)."""
    spec = {k: (d, tuple(s)) for k, d, s in specs}
    groups = plan_shards([(k, nbytes(d, s)) for k, d, s in specs], max_shard_bytes)
    paths, index = output_paths(out, len(groups))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(paths[0].parent)
    temps = [temp_path(p) for p in paths]
    it: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    try:
        for keys, tmp in zip(groups, temps):
            with open(tmp, "wb") as f:
                f.write(header_bytes([(k, *spec[k]) for k in keys], metadata))
                for want in keys:
                    key, t = next(it)
                    if key != want or t.dtype != spec[key][0] or tuple(t.shape) != spec[key][1]:
                        raise RuntimeError(f"writer expected {want} {spec[want]}, got {key} "
                                           f"{t.dtype} {tuple(t.shape)}")
                    if t.numel():
                        f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                    del t  # not alive while the next one is computed: one tensor at a time
                f.flush()
                os.fsync(f.fileno())
        for tmp, p in zip(temps, paths):
            os.replace(tmp, p)
        sync_directory(paths[0].parent)  # the renames survive a crash
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    if index is None:
        return paths
    weight_map = {k: p.name for keys, p in zip(groups, paths) for k in keys}
    total = sum(nbytes(*spec[k]) for k in spec)
    body = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(index, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return [*paths, index]


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """One safetensors file at `path` (a ``.safetensors`` name) holding `tensors` (moved to
    the CPU, made contiguous), in the order of their names, so the same tensors and metadata
    always give the same bytes whatever order the dict has; atomic. Returns `path`."""
    keys = sorted(tensors)
    cpu = {k: tensors[k].detach().contiguous().cpu() for k in keys}
    specs = [(k, cpu[k].dtype, tuple(cpu[k].shape)) for k in keys]
    (written,) = write_checkpoint(path, specs, cpu.items(), ONE_FILE,
                                  None if metadata is None else dict(metadata))
    return written
