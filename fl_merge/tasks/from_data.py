"""Tasks declared from data: an image folder, a CSV / JSON-lines / parquet table, or a
Hugging Face `datasets` dataset, named by a task spec (fl_merge/tasks/specs.py, docs/data.md).

Inputs become what the model's input kind expects, exactly as the built-in tasks make them:
images are decoded with PIL, converted to grey (or RGB with channels=3), resized to `size`
(28 by default: the MNIST-family input every image model here reads) and MNIST-normalised
(fl_merge.data.offline.mnist_to_tensor); texts become UTF-8 byte tensors (fl_merge.data.offline.encode_texts)
that the text backbone tokenises, repeated texts kept once (fl_merge.data.offline._dedupe). Splits are
a seeded permutation of the examples (split_counts says how many go where). Importing this
module registers one task family per format (fl_merge.core.registration imports it).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fl_merge.tasks.specs import (
    FORMATS,
    TABLE_FORMATS,
    DataTaskError,
    DataTaskSpec,
    map_labels,
    parse_task_spec,
    split_counts,
)
from fl_merge.tasks.registry import SplitSizes, TaskData, TaskFamily, _stable_seed, register_task_family
from fl_merge.data.offline import _dedupe, encode_texts, mnist_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Table:
    """A data task's examples before splitting: inputs (texts, image paths or images), class
    ids, class names, input kind, and the folder relative image paths start from."""

    inputs: tuple[Any, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    kind: str
    base: Path | None


def fingerprint(name: str) -> str:
    """Changes when the spec's file or folder does: size and mtime of the table file, or of
    every file under the image folder; a Hugging Face dataset: its name, config and split."""
    spec = parse_task_spec(name)
    if spec.format == "hf":
        return f"hf|{spec.location}|{spec.config}|{spec.split}"
    root = Path(spec.location)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for p in files:
        st = p.stat() if p.exists() else None
        h.update(f"{p.relative_to(root) if root.is_dir() else p}|{st and st.st_size}|"
                 f"{st and st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_table(spec: DataTaskSpec) -> Table:
    """The spec's examples (cached while its files are unchanged); raises DataTaskError."""
    return _read_table(spec, fingerprint(spec.name))


@functools.lru_cache(maxsize=8)
def _read_table(spec: DataTaskSpec, _fingerprint: str) -> Table:
    if spec.format == "folder":
        inputs, raw, kind, base = _read_folder(spec)
    elif spec.format == "hf":
        inputs, raw, kind, base = _read_hf(spec)
    else:
        inputs, raw, kind, base = _read_file(spec)
    empty = [i for i, v in enumerate(inputs) if v is None or (isinstance(v, float) and np.isnan(v))]
    if empty:
        raise DataTaskError(f"task '{spec.name}': input column '{spec.input}' has {len(empty)} "
                            f"empty value(s) (first at row {empty[0]}); fill or drop those rows")
    ids, classes = map_labels(spec.name, spec.label if spec.format != "folder" else "(class folders)",
                              raw, spec.labels)
    return Table(tuple(inputs), ids, tuple(classes), kind, base)


def _read_folder(spec: DataTaskSpec) -> tuple[list, list, str, Path | None]:
    root = Path(spec.location)
    if not root.is_dir():
        raise DataTaskError(f"task '{spec.name}': image folder '{root}' does not exist")
    inputs, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                inputs.append(str(f))
                labels.append(folder.name)
    if not inputs:
        raise DataTaskError(f"task '{spec.name}': image folder '{root}' has no class subfolders "
                            f"holding images ({', '.join(IMAGE_SUFFIXES)}); expected {root}/<class>/<image>")
    return inputs, labels, "image", root


def _read_file(spec: DataTaskSpec) -> tuple[list, list, str, Path | None]:
    import pandas as pd

    path = Path(spec.location)
    if not path.is_file():
        raise DataTaskError(f"task '{spec.name}': {spec.format} file '{path}' does not exist")
    readers = {"csv": pd.read_csv, "jsonl": functools.partial(pd.read_json, lines=True),
               "parquet": pd.read_parquet}
    try:
        frame = readers[spec.format](path)
    except Exception as e:  # pandas/pyarrow parse errors have no common base class
        raise DataTaskError(f"task '{spec.name}': cannot read '{path}' as {spec.format}: "
                            f"{_first_line(e)}") from None
    _check_columns(spec, [str(c) for c in frame.columns], f"file '{path}'")
    inputs = [_plain(v) for v in frame[spec.input].tolist()]
    return inputs, [_plain(v) for v in frame[spec.label].tolist()], spec.input_kind, path.parent


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values (labels sort and compare as Python values)."""
    return value.item() if isinstance(value, np.generic) else value


def _check_columns(spec: DataTaskSpec, columns: list[str], where: str) -> None:
    for option in ("input", "label"):
        column = getattr(spec, option)
        if column not in columns:
            raise DataTaskError(f"task '{spec.name}': {where} has no column '{column}' ({option}=); "
                                f"its columns: {', '.join(columns)}")
    if spec.input == spec.label:
        raise DataTaskError(f"task '{spec.name}': input and label are the same column '{spec.input}'")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _read_hf(spec: DataTaskSpec) -> tuple[list, list, str, Path | None]:
    import contextlib
    from unittest import mock

    import datasets
    import huggingface_hub.constants as hub

    offline = _offline()
    with contextlib.ExitStack() as stack:
        if offline:  # the libraries read these variables at import: apply them now as well
            stack.enter_context(mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True))
            stack.enter_context(mock.patch.object(hub, "HF_HUB_OFFLINE", True))
        try:
            ds = datasets.load_dataset(spec.location, spec.config or None, split=spec.split)
        except Exception as e:  # network, missing dataset/config/split: all one message
            what = f"Hugging Face dataset '{spec.location}'"
            what += f" (config '{spec.config}')" if spec.config else ""
            why = ("offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set) and not in the local "
                   "datasets cache" if offline else _first_line(e))
            local = f"/abs/{spec.location.split('/')[-1]}.csv"
            raise DataTaskError(
                f"task '{spec.name}': cannot load {what}, split '{spec.split}': {why}; to use a local "
                f"copy, save it once where you are online (datasets.load_dataset(...).to_csv("
                f"'{local}') or .to_parquet(...)) and declare the task as "
                f"csv:{local}?input={spec.input}&label={spec.label}") from None
    _check_columns(spec, list(ds.column_names), f"dataset '{spec.location}' split '{spec.split}'")
    is_image = isinstance(ds.features[spec.input], datasets.Image)
    kind = spec.kind or ("image" if is_image else "text")
    return list(ds[spec.input]), list(ds[spec.label]), kind, None


def check(name: str) -> str:
    """Validate a data task before any training; return its input kind (DataTaskError)."""
    spec = parse_task_spec(name)
    table = read_table(spec)
    split_counts(name, len(table.labels), spec, *_defaults())
    if table.kind == "image" and spec.format in TABLE_FORMATS:
        for row, item in enumerate(table.inputs):
            path = _image_path(item, table.base)
            if path is not None and not path.is_file():
                raise DataTaskError(f"task '{name}': image file '{path}' (row {row}, column "
                                    f"'{spec.input}') does not exist")
    return table.kind


def _defaults() -> tuple[int, int, int]:
    s = SplitSizes()
    return s.train, s.val, s.test


def _image_path(item: Any, base: Path | None) -> Path | None:
    """The file an image cell names (relative paths start at the table's folder); None for
    an image held in the cell itself."""
    if isinstance(item, dict):
        item = None if item.get("bytes") else item.get("path")
    if not isinstance(item, (str, os.PathLike)):
        return None
    path = Path(item)
    return path if path.is_absolute() or base is None else base / path


def load_images(items: list[Any], base: Path | None, size: int, channels: int, name: str = ""
                ) -> torch.Tensor:
    """Image files / PIL images / {'bytes': ...} cells -> float [N, channels, size, size],
    MNIST-normalised like every image task here (fl_merge.data.offline.mnist_to_tensor)."""
    from PIL import Image, UnidentifiedImageError

    out = np.zeros((len(items), size, size, channels), dtype=np.uint8)
    for i, item in enumerate(items):
        path = _image_path(item, base)
        try:
            if path is not None:
                with Image.open(path) as img:
                    out[i] = _pixels(img, size, channels)
            elif isinstance(item, dict):
                with Image.open(io.BytesIO(item["bytes"])) as img:
                    out[i] = _pixels(img, size, channels)
            else:
                out[i] = _pixels(item, size, channels)
        except (OSError, UnidentifiedImageError, AttributeError) as e:
            raise DataTaskError(f"task '{name}': cannot read image {path or type(item).__name__}: "
                                f"{type(e).__name__}") from None
    grey = out.transpose(0, 3, 1, 2).reshape(-1, size, size)  # channels as extra images
    return mnist_to_tensor(grey).reshape(len(items), channels, size, size)


def _pixels(img: Any, size: int, channels: int) -> np.ndarray:
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


def load(name: str, seed: int, sizes: SplitSizes) -> TaskData:
    """The data task `name` as TaskData: a seeded permutation cut into train/val/test."""
    spec = parse_task_spec(name)
    table = read_table(spec)
    inputs, labels = list(table.inputs), table.labels
    if table.kind == "text":
        inputs, labels = _dedupe([str(v) for v in inputs], labels.tolist())
    counts = split_counts(name, len(labels), spec, sizes.train, sizes.val, sizes.test)
    order = np.random.default_rng(_stable_seed(name, seed)).permutation(len(labels))
    parts = np.split(order, np.cumsum(counts))[:3]

    def make(idx: np.ndarray) -> TensorDataset:
        chosen = [inputs[i] for i in idx]
        x = (encode_texts([str(v) for v in chosen]) if table.kind == "text"
             else load_images(chosen, table.base, spec.size, spec.channels, name))
        return TensorDataset(x, torch.as_tensor(labels[idx], dtype=torch.int64))

    train, val, test = (make(p) for p in parts)
    return TaskData(name, len(table.classes), train, val, test,
                    probe=val if spec.probe == "val" else None)


_USAGE = {"folder": "folder:/abs/dir", "hf": "hf:<dataset>?split=train&input=..&label=.."}
for _fmt in FORMATS:
    register_task_family(_fmt, TaskFamily(
        usage=_USAGE.get(_fmt, f"{_fmt}:/abs/file.{_fmt}?input=<column>&label=<column>"),
        check=check, load=load, fingerprint=fingerprint))
