"""Spill: client updates on disk instead of in memory, for large models through deployment.

The ServerApp holds every client's full weights from the moment its train reply arrives,
then one task vector per client: 2K copies of the model. With spilling, each reply is
written to a safetensors file as it arrives (`SpillDir.write`, streamed one tensor at a time
by `fl_merge.core.safetensors_writer.write_checkpoint`) and the message is dropped; task vectors are
written alike (`SpillDir.task_vector`). Both are read back as `MappedState`: a read-only
mapping whose every access memory-maps just that tensor's bytes (zero copy, `mmap` +
`torch.frombuffer`). Its pages are file-backed (the kernel can drop them and read them back)
and are unmapped when the returned tensor is freed, so code that walks the tensors one at a
time (the aggregation library's blocks, finiteness checks) holds at most K copies of ONE
tensor, not K models. Every consumer receives ordinary CPU tensors: results are identical
to the in-memory path. Writes that reach a spilled tensor stay private to that tensor
(copy-on-write mapping), the file never changes.

Files live in one temporary folder (`SpillDir`, ``.spill-*`` under the run's output folder
by default) that `cleanup` removes, also when the round fails: nothing is kept.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import torch

from fl_merge.core.safetensors_writer import DTYPES, ONE_FILE, write_checkpoint
from fl_merge.io.checkpoints import read_header
from fl_merge.core.task_vectors import EXTRA_PREFIX, MergeInputError, StateDict, check_pair, task_vector, vector_dtype


class MappedState(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only name -> tensor mapping; each lookup maps only
    that tensor (zero copy) and the mapping ends when the tensor is garbage-collected."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        start, head, self.metadata = read_header(self.path)
        self._start = start
        self._entries = head
        for key, e in head.items():
            if e["dtype"] not in DTYPES:
                raise MergeInputError(f"spill file {self.path}: tensor '{key}' has dtype {e['dtype']}")

    def __getitem__(self, key: str) -> torch.Tensor:
        e = self._entries[key]  # KeyError for an unknown key, as a dict
        dtype, shape = DTYPES[e["dtype"]], tuple(int(n) for n in e["shape"])
        lo, hi = (int(x) for x in e["data_offsets"])
        if hi == lo:
            return torch.empty(shape, dtype=dtype)
        pos = self._start + lo
        aligned = pos - pos % mmap.ALLOCATIONGRANULARITY
        m = self._map(self._start + hi - aligned, aligned)
        # frombuffer keeps `m` alive for as long as the tensor lives, then unmaps it
        return torch.frombuffer(m, dtype=dtype, count=(hi - lo) // dtype.itemsize,
                                offset=pos - aligned).reshape(shape)

    def _map(self, length: int, offset: int) -> mmap.mmap:
        with open(self.path, "rb") as f:  # the mapping outlives the descriptor
            return mmap.mmap(f.fileno(), length, access=mmap.ACCESS_COPY, offset=offset)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:  # without mapping the tensor
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"MappedState({str(self.path)!r}, {len(self)} tensors)"


def array_view(array: Any) -> torch.Tensor:
    """A Flower Array (``.npy`` bytes in `data`) as a tensor viewing those bytes, without the
    copy that `Array.numpy()` (np.load) makes. Read-only data: writing to it is an error."""
    buf = io.BytesIO(array.data)
    version = np.lib.format.read_magic(buf)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(buf)
    if fortran or dtype.hasobject:
        return torch.from_numpy(array.numpy())
    count = int(np.prod(shape)) if shape else 1
    a = np.frombuffer(array.data, dtype=dtype, count=count, offset=buf.tell()).reshape(shape)
    with warnings.catch_warnings():  # "non-writable": the view is only read (written to disk)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc `malloc_trim`; a no-op elsewhere).
    Python frees a message's buffers, but glibc keeps the pages of a fragmented heap, so the
    process's resident size stays at its peak (measured: 2-3 backbones after each phase)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _torch_dtype(numpy_dtype: str) -> torch.dtype:
    """The torch dtype of a numpy dtype name (an Array's `dtype`)."""
    return torch.from_numpy(np.empty(0, dtype=np.dtype(numpy_dtype))).dtype


def _specs(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> list[tuple[str, torch.dtype, tuple]]:
    return [(k, state[k].dtype, tuple(state[k].shape)) for k in keys]


class SpillDir:
    """A temporary folder of spilled states (under `parent`, default the system's temp
    folder); `cleanup` removes it and everything in it."""

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=".spill-", dir=parent))
        self._n = 0

    def _file(self, name: str) -> Path:
        self._n += 1
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        return self.path / f"{self._n:04d}-{safe}.safetensors"

    def write(self, name: str, state: Mapping[str, torch.Tensor]) -> MappedState:
        """Write `state` (any mapping of CPU tensors, read one tensor at a time) and return
        it as a MappedState."""
        keys = list(state)
        path = self._file(name)
        write_checkpoint(path, _specs(state, keys), ((k, state[k]) for k in keys),
                         max_shard_bytes=ONE_FILE)
        return MappedState(path)

    def write_arrays(self, name: str, arrays: MutableMapping[str, Any]) -> MappedState:
        """Write a Flower ArrayRecord (name -> Array: `shape`, `dtype`, `numpy()`) and EMPTY
        it: each Array is popped as it is written, so its bytes are freed one at a time
        instead of the whole record living beside a converted copy."""
        keys = list(arrays)
        specs = [(k, _torch_dtype(arrays[k].dtype), tuple(arrays[k].shape)) for k in keys]

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for k in keys:
                yield k, array_view(arrays.pop(k))

        path = self._file(name)
        write_checkpoint(path, specs, tensors(), max_shard_bytes=ONE_FILE)
        return MappedState(path)

    def task_vector(self, name: str, state: Mapping[str, torch.Tensor],
                    theta0: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> MappedState:
        """tau = state - theta0 over `keys` (`fl_merge.core.task_vectors.task_vector`: same checks,
        same arithmetic), computed and written one tensor at a time."""
        keys = check_pair(state, theta0, keys)
        specs = [(k, vector_dtype(theta0[k].dtype), tuple(theta0[k].shape)) for k in keys]
        tensors = ((k, task_vector({k: state[k]}, {k: theta0[k]})[k]) for k in keys)
        path = self._file(name)
        write_checkpoint(path, specs, tensors, max_shard_bytes=ONE_FILE)
        return MappedState(path)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def materialize(state: Mapping[str, torch.Tensor]) -> StateDict:
    """An in-memory copy of a (mapped) state: own tensors, the file no longer needed."""
    return {k: state[k].clone() for k in state}


class KeyView(Mapping[str, torch.Tensor]):
    """Some keys of a (mapped) state under other names, still lazy: new name -> old name."""

    def __init__(self, base: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> None:
        self._base, self._names = base, dict(names)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._base[self._names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def __len__(self) -> int:
        return len(self._names)


class JoinedState(Mapping[str, torch.Tensor]):
    """Several (mapped) states as one read-only mapping, in their order (a chunked reply's
    groups, each in its own spill file); a name in two parts is an error."""

    def __init__(self, parts: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self._where: dict[str, Mapping[str, torch.Tensor]] = {}
        for part in parts:
            for k in part:
                if k in self._where:
                    raise MergeInputError(f"tensor '{k}' arrived in two chunks")
                self._where[k] = part

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)


def split_extras_lazy(state: Mapping[str, torch.Tensor]
                      ) -> tuple[KeyView, dict[str, KeyView]]:
    """`fl_merge.core.task_vectors.split_extras` without reading a tensor: (weights, {name:
    {param: tensor}}) as lazy views of `state`."""
    weights: dict[str, str] = {}
    extras: dict[str, dict[str, str]] = {}
    for k in state:
        if k.startswith(EXTRA_PREFIX):
            name, _, param = k[len(EXTRA_PREFIX):].partition(".")
            extras.setdefault(name, {})[param] = k
        else:
            weights[k] = k
    return KeyView(state, weights), {n: KeyView(state, m) for n, m in extras.items()}
