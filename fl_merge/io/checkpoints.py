"""Checkpoints on disk as lazy tensor sources: the one checkpoint reader (the base and the
fine-tuned checkpoints alike).

Reading: `Checkpoint(path)` opens a safetensors file, a sharded folder with its index
(``*.safetensors.index.json``, or the index file itself) or a Hugging Face model folder
(``model.safetensors`` or sharded inside), checked by safetensors' `safe_open`; each tensor
is read only when asked (`get`, a positioned read), so a caller holds one tensor at a time,
never the model.

With ``pickles=True`` (checkpoint clients) a torch state dict is accepted too: a
``.pt``/``.pth``/``.bin``/``.ckpt`` file, or a Hugging Face folder holding only
``pytorch_model.bin``, read with ``torch.load(weights_only=True)`` (tensors and plain
containers only, never arbitrary objects). A pickle cannot be read tensor by tensor, so it
is held in memory whole; `fl-merge merge`, which promises one tensor at a time, keeps
refusing it.

Writing: `fl_merge.core.safetensors_writer` (the one safetensors writer).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fl_merge.core.safetensors_writer import DTYPE_NAMES, DTYPES, HF_WEIGHTS, nbytes
from fl_merge.core.task_vectors import MergeInputError

INDEX_SUFFIX = ".safetensors.index.json"
# --dtype spellings.
DTYPE_ALIASES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}
FORMATS = ("a .safetensors file, a folder with model.safetensors or a sharded "
           "*.safetensors.index.json, or that index file")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_PICKLE = "pytorch_model.bin"


def parse_dtype(name: str) -> torch.dtype:
    """--dtype value -> torch dtype (float types only)."""
    try:
        return DTYPE_ALIASES[str(name).lower()]
    except KeyError:
        raise MergeInputError(
            f"unknown dtype {name!r}; use one of {', '.join(DTYPE_ALIASES)}") from None


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' (bytes) -> bytes, as Hugging Face's max_shard_size."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().upper()
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6,
                 "GB": 10**9, "B": 1}
        mult = next((m for u, m in units.items() if s.endswith(u)), 1)
        digits = next((s[: -len(u)] for u in units if s.endswith(u)), s)
        try:
            value = int(float(digits) * mult)
        except ValueError:
            raise MergeInputError(
                f"max shard size must be a size like 5GB, 500MB or 2GiB, got {text!r}") from None
    if value < 1:
        raise MergeInputError(f"max shard size must be positive, got {text!r}")
    return value


def _files_of(path: Path, role: str) -> dict[str, Path]:
    """key -> file holding it, for any accepted form of `path`."""
    if not path.exists():
        raise MergeInputError(f"{role}: no such file or folder: {path} (want {FORMATS})")
    if path.is_dir():
        indexes = sorted(path.glob("*" + INDEX_SUFFIX))
        if (path / ("model" + INDEX_SUFFIX)).is_file():
            return _files_of(path / ("model" + INDEX_SUFFIX), role)
        if (path / HF_WEIGHTS).is_file():
            return _files_of(path / HF_WEIGHTS, role)
        if len(indexes) == 1:
            return _files_of(indexes[0], role)
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) == 1 and not indexes:
            return _files_of(singles[0], role)
        found = [p.name for p in indexes + singles][:5]
        raise MergeInputError(f"{role}: folder {path} holds no single checkpoint "
                              f"(found {found or 'no safetensors files'}); want {FORMATS}")
    if path.name.endswith(INDEX_SUFFIX):
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise MergeInputError(f"{role}: {path} is not a safetensors index "
                                  "(JSON with a 'weight_map' of tensor -> shard file)") from None
        files = {k: path.parent / str(f) for k, f in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise MergeInputError(f"{role}: shard file(s) {missing[:3]} named in {path} are missing")
        return files
    if path.suffix in PICKLE_SUFFIXES:
        raise MergeInputError(f"{role}: {path} is a torch pickle; fl-merge merge reads {FORMATS} "
                              "(convert with safetensors.torch.save_file)")
    return {"": path}  # one file; its keys are read when it is opened


def pickle_file(path: Path) -> Path | None:
    """The torch pickle `path` names: itself (a .pt/.pth/.bin/.ckpt file), or a folder's
    pytorch_model.bin when the folder holds no safetensors weights; else None."""
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        return path
    if path.is_dir() and (path / HF_PICKLE).is_file() and not any(path.glob("*.safetensors*")):
        return path / HF_PICKLE
    return None


def load_state_pickle(path: Path, role: str) -> dict[str, torch.Tensor]:
    """A torch state dict file -> {name: tensor}, loaded with weights_only=True. A dict
    nesting the weights under 'state_dict' (Lightning) or 'model' is unwrapped."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and torch raise many types; one line for the user
        raise MergeInputError(f"{role}: cannot read {path} as a torch state dict with "
                              f"weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise MergeInputError(f"{role}: {path} holds no state dict (want a non-empty dict of "
                              f"name -> tensor, got {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise MergeInputError(f"{role}: {path} is not a state dict: entries {bad[:3]} are not "
                              "name -> tensor")
    unknown = sorted({str(v.dtype) for v in obj.values() if v.dtype not in DTYPE_NAMES})
    if unknown:
        raise MergeInputError(f"{role}: {path} has tensors of dtype {unknown}, which fl-merge "
                              f"cannot handle")
    return {k: v.detach().contiguous() for k, v in obj.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name ("F16", "I64", ...)
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


def read_header(path: Path) -> tuple[int, dict[str, dict], dict[str, str]]:
    """(data start, tensor entries, __metadata__) of a safetensors file: the u64 length and
    the JSON header that the format puts first (file already validated by safe_open)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
    meta = head.pop("__metadata__", None) or {}
    return 8 + n, head, meta


class Checkpoint:
    """Lazy, read-only tensor source over one checkpoint (`role` names it in errors).

    keys: tensor names in file order; info(key): dtype name and shape without reading the
    data; get(key): the tensor (a fresh CPU tensor of its own); metadata: the first file's
    ``__metadata__`` (str -> str).

    Files are checked with safetensors' `safe_open`, but data is read with plain positioned
    reads into a tensor of the right size: a tensor that `safe_open().get_tensor` returns
    keeps the file's memory-mapped pages resident in the process once touched, so merging
    K 1 GB files grew the resident set by K GB (measured, safetensors 0.8); `pread` costs
    exactly one tensor.

    pickles=True also opens a torch state dict (`pickle_file`), held in memory whole."""

    def __init__(self, path: str | os.PathLike, role: str = "checkpoint", pickles: bool = False) -> None:
        self.path, self.role = Path(path), role
        self._fds: dict[Path, int] = {}
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        self._tensors: dict[str, torch.Tensor] = {}  # a torch pickle's tensors
        self.metadata: dict[str, str] = {}
        pickled = pickle_file(self.path) if pickles else None
        if pickled is not None:
            self._tensors = load_state_pickle(pickled, role)
            self.keys: list[str] = list(self._tensors)
            return
        files = _files_of(self.path, role)
        headers = {}
        for f in dict.fromkeys(files.values()):
            try:
                with safe_open(str(f), framework="pt") as h:
                    h.keys()
                headers[f] = read_header(f)
            except Exception as e:  # safetensors raises its own error types
                raise MergeInputError(f"{role}: cannot read {f} as safetensors ({e})") from None
        self.metadata = dict(next(iter(headers.values()))[2]) if headers else {}
        if "" in files:  # a single file: all its keys
            ((f, (start, head, _)),) = headers.items()
            self._entries = {k: (f, start, e) for k, e in head.items()}
        else:
            for k, f in files.items():
                start, head, _ = headers[f]
                if k not in head:
                    raise MergeInputError(f"{role}: index names tensor '{k}' in {f.name}, "
                                          "which does not hold it")
                self._entries[k] = (f, start, head[k])
        for k, (f, _, e) in self._entries.items():
            lo, hi = (int(x) for x in e["data_offsets"])
            if e["dtype"] in DTYPES and hi - lo != nbytes(DTYPES[e["dtype"]], e["shape"]):
                raise MergeInputError(f"{role}: tensor '{k}' in {f} has {hi - lo} bytes for "
                                      f"shape {e['shape']} {e['dtype']}")
        self.keys: list[str] = list(self._entries)

    def info(self, key: str) -> TensorInfo:
        if self._tensors:
            t = self._tensors[key]
            return TensorInfo(DTYPE_NAMES[t.dtype], tuple(t.shape))
        e = self._entries[key][2]
        return TensorInfo(e["dtype"], tuple(int(n) for n in e["shape"]))

    def file_of(self, key: str) -> Path | None:
        """The safetensors file holding tensor `key`; None for a torch pickle's (in memory)."""
        return None if self._tensors else self._entries[key][0]

    def get(self, key: str) -> torch.Tensor:
        if self._tensors:
            return self._tensors[key].clone()
        e = self._entries[key][2]
        n = 1
        for d in e["shape"]:
            n *= int(d)
        return self.read_flat(key, 0, n).reshape(tuple(e["shape"]))

    def read_flat(self, key: str, start: int, stop: int, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Elements start:stop of the flattened tensor `key`, read into `out` (a flat
        contiguous tensor of its dtype and length stop - start) or a new tensor."""
        if self._tensors:
            part = self._tensors[key].reshape(-1)[start:stop]
            return part.clone() if out is None else out.copy_(part)
        f, base, e = self._entries[key]
        dtype = DTYPES.get(e["dtype"])
        if dtype is None:
            raise MergeInputError(f"{self.role}: tensor '{key}' has dtype {e['dtype']}, which "
                                  f"fl-merge cannot handle (known: {', '.join(DTYPES)})")
        t = torch.empty(stop - start, dtype=dtype) if out is None else out
        self.read_into(key, start, memoryview(t.view(torch.uint8).numpy()))
        return t

    def read_into(self, key: str, start: int, buf: memoryview) -> None:
        """Fill the byte buffer `buf` from element `start` of tensor `key` on (the low-level
        read behind `read_flat`, for callers reusing one buffer)."""
        if self._tensors:  # a pickle is in memory: read_flat copies from it
            raise MergeInputError(f"{self.role}: read_into reads files; use read_flat on a pickle")
        f, base, e = self._entries[key]
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds[f] = os.open(f, os.O_RDONLY)
        pos = base + int(e["data_offsets"][0]) + start * DTYPES[e["dtype"]].itemsize
        done, want = 0, len(buf)
        while done < want:
            n = os.preadv(fd, [buf[done:] if done else buf], pos + done)
            if n <= 0:
                raise MergeInputError(f"{self.role}: {f} ends inside tensor '{key}'")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
