"""Task specs: a task declared from data, as one string usable wherever a task name is.

    <format>:<location>[?<option>=<value>&...]

    folder:/data/digits                             image folder, one subfolder per class
    csv:/data/bbc.csv?input=text&label=category     a table: input and label columns
    jsonl:/data/bbc.jsonl?input=body&label=topic    JSON lines
    parquet:/data/bbc.parquet?labels=int            parquet
    hf:ag_news?split=train&input=text&label=label   a Hugging Face `datasets` dataset

The string travels through Flower's flat run-config (``tasks=...``, ``partition-task=...``);
Hydra configs give the same as a mapping (`format_task_spec`). Everything here is pure:
`parse_task_spec` is the one place a spec string is read, `split_counts` and `map_labels`
the decisions a data task makes; fl_merge/tasks/from_data.py reads the files. docs/data.md lists
every option.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import PurePath
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

FORMATS = ("folder", "csv", "jsonl", "parquet", "hf")
TABLE_FORMATS = ("csv", "jsonl", "parquet")
KINDS = ("text", "image")
LABEL_MODES = ("sorted", "int")
PROBES = ("train", "val")
# Default split shares of a data task's examples (capped by the sizes the caller asks for).
VAL_SHARE, TEST_SHARE = 0.15, 0.25


class DataTaskError(ValueError):
    """A task spec that cannot be used; the message (one line) names what is wrong."""


@dataclass(frozen=True)
class DataTaskSpec:
    """A parsed task spec (see the module docstring); `name` is the spec string itself."""

    name: str
    format: str
    location: str  # absolute file or folder path, or a Hugging Face dataset name
    input: str = "text"  # the input column (text, or an image path / image)
    label: str = "label"  # the label column
    kind: str = ""  # text | image; empty: image for folders, else text (hf: from the features)
    labels: str = "sorted"  # sorted: ints by sorted unique values | int: the values are class ids
    train: float | None = None  # examples (>= 1) or a share of them (< 1); None: the default
    val: float | None = None
    test: float | None = None
    probe: str = "train"  # the split the task head is fitted on (TaskData.probe)
    size: int = 28  # image side in pixels after resizing
    channels: int = 1  # 1 (grey) or 3 (RGB)
    config: str = ""  # hf: the dataset's configuration name
    split: str = "train"  # hf: the split (or split expression, e.g. train[:5000]) to load

    @property
    def input_kind(self) -> str:
        return self.kind or ("image" if self.format == "folder" else "text")


OPTIONS = tuple(f.name for f in fields(DataTaskSpec) if f.name not in ("name", "format", "location"))
_HF_ONLY = ("config", "split")
_IMAGE_ONLY = ("size", "channels")


def parse_task_spec(text: str) -> DataTaskSpec:
    """'csv:/abs/bbc.csv?input=text&label=category' -> DataTaskSpec; raises DataTaskError.

    The location is percent-decoded (a path with ',', ' ', '?' or '&' is written %2C, %20,
    %3F, %26, as `format_task_spec` does); files and folders must be absolute paths, since
    clients may run in another directory."""
    fmt, sep, rest = str(text).partition(":")
    where = f"task '{text}'"
    if not sep or fmt not in FORMATS:
        raise DataTaskError(f"{where}: unknown data format '{fmt}'; a task spec is "
                            f"<format>:<path>[?option=value&...] with format one of {', '.join(FORMATS)}")
    raw_location, _, query = rest.partition("?")
    location = unquote(raw_location)
    if not location:
        raise DataTaskError(f"{where}: no {'dataset name' if fmt == 'hf' else 'path'} after '{fmt}:'")
    if fmt != "hf" and not PurePath(location).is_absolute():
        raise DataTaskError(f"{where}: path '{location}' must be absolute (clients may run in "
                            f"another directory), e.g. {fmt}:{os.path.abspath(location)}")
    values: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        key, value = unquote(key), unquote(value)  # '+' stays '+': hf splits read train+test
        if not eq:
            raise DataTaskError(f"{where}: option '{item}' is not name=value (options are joined by '&')")
        if key not in OPTIONS:
            raise DataTaskError(f"{where}: unknown option '{key}'; known: {', '.join(OPTIONS)}")
        if key in values:
            raise DataTaskError(f"{where}: option '{key}' given twice")
        values[key] = _option(where, key, value)
    if fmt != "hf" and (bad := [k for k in _HF_ONLY if k in values]):
        raise DataTaskError(f"{where}: option(s) {bad} apply to hf: datasets only")
    if fmt == "folder" and values.get("kind", "image") != "image":
        raise DataTaskError(f"{where}: an image folder holds images: kind must be image")
    spec = DataTaskSpec(name=str(text), format=fmt, location=location, **values)
    known_kind = spec.kind or spec.format != "hf"  # hf without kind=: from its features
    if known_kind and spec.input_kind == "text" and (bad := [k for k in _IMAGE_ONLY if k in values]):
        raise DataTaskError(f"{where}: option(s) {bad} apply to image inputs only (kind=image)")
    return spec


def _option(where: str, key: str, value: str) -> Any:
    """One option's value, typed and checked."""
    choices = {"kind": KINDS, "labels": LABEL_MODES, "probe": PROBES}
    if key in choices:
        if value not in choices[key]:
            raise DataTaskError(f"{where}: {key}={value!r} must be one of {', '.join(choices[key])}")
        return value
    if key in ("train", "val", "test"):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (0 < number < 1 or (number >= 1 and number == int(number))):
            raise DataTaskError(f"{where}: {key}={value!r} must be a count of examples (an integer "
                                f">= 1) or a share of them in (0, 1)")
        return number
    if key in ("size", "channels"):
        ok = value.isdigit() and (int(value) >= 4 if key == "size" else value in ("1", "3"))
        if not ok:
            raise DataTaskError(f"{where}: {key}={value!r} must be "
                                f"{'an integer >= 4 (pixels)' if key == 'size' else '1 or 3'}")
        return int(value)
    if not value:
        raise DataTaskError(f"{where}: option '{key}' is empty")
    return value


# Keys of the structured (Hydra) form besides the options: the format and its location.
LOCATION_KEYS = ("path", "dataset")


def format_task_spec(node: Mapping[str, Any]) -> str:
    """The structured form -> the spec string: {format: csv, path: /abs/bbc.csv, input: text,
    label: category} -> 'csv:/abs/bbc.csv?input=text&label=category' (hf: `dataset` instead
    of `path`). Null values are left out; the result parses back to the same spec."""
    where = f"data task {dict(node)}"
    fmt = node.get("format")
    if fmt not in FORMATS:
        raise DataTaskError(f"{where}: 'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")
    want = "dataset" if fmt == "hf" else "path"
    other = [k for k in LOCATION_KEYS if k != want and node.get(k) is not None]
    if node.get(want) is None or other:
        raise DataTaskError(f"{where}: a {fmt} task needs '{want}'" + (f", not {other}" if other else ""))
    unknown = [k for k in node if k not in ("format", *LOCATION_KEYS, *OPTIONS)]
    if unknown:
        raise DataTaskError(f"{where}: unknown key(s) {unknown}; known: format, {want}, {', '.join(OPTIONS)}")
    query = "&".join(f"{k}={quote(_plain(node[k]), safe='')}" for k in OPTIONS if node.get(k) is not None)
    text = f"{fmt}:{quote(str(node[want]), safe='/:')}" + (f"?{query}" if query else "")
    parse_task_spec(text)  # a bad value fails here, with the spec named
    return text


def _plain(value: Any) -> str:
    """A YAML value as the spec writes it (0.2 -> '0.2', 500 -> '500', true -> 'true')."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def split_counts(name: str, n: int, spec: DataTaskSpec, train: int, val: int, test: int
                 ) -> tuple[int, int, int]:
    """(train, val, test) example counts for a data task of `n` examples.

    A split the spec sets is that many examples (a share < 1: round(share * n)). Otherwise
    val = min(val, 15% of n), test = min(test, 25% of n) and train = min(train, the rest):
    `train`/`val`/`test` are what the caller asks for (fl_merge.tasks.registry.SplitSizes). Raises
    DataTaskError when a split would be empty or the splits need more than n examples."""

    def given(share: float | None) -> int | None:
        return None if share is None else (round(share * n) if share < 1 else int(share))

    n_val = given(spec.val)
    n_val = min(val, int(VAL_SHARE * n)) if n_val is None else n_val
    n_test = given(spec.test)
    n_test = min(test, int(TEST_SHARE * n)) if n_test is None else n_test
    n_train = given(spec.train)
    n_train = min(train, n - n_val - n_test) if n_train is None else n_train
    counts = (n_train, n_val, n_test)
    if min(counts) < 1 or sum(counts) > n:
        raise DataTaskError(f"task '{name}' has {n} examples: too few for train/val/test = "
                            f"{n_train}/{n_val}/{n_test} (each split needs at least 1; set "
                            f"train=, val=, test= to counts or shares that fit)")
    return counts


def map_labels(name: str, column: str, values: Sequence[Any], mode: str = "sorted"
               ) -> tuple[np.ndarray, list[str]]:
    """Raw label values -> (int64 class ids, class names).

    sorted: class i is the i-th of the sorted distinct values (numbers sorted as numbers,
    anything else as text). int: the values are the class ids 0..C-1 themselves (C = the
    largest + 1). Raises DataTaskError for a missing value, a non-integer id, or one class."""
    where = f"task '{name}': label column '{column}'"
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise DataTaskError(f"{where} has {len(missing)} empty value(s) (first at row {missing[0]}); "
                            "fill or drop those rows")
    if mode == "int":
        bad = [v for v in values if isinstance(v, bool) or not _is_int(v) or int(float(v)) < 0]
        if bad:
            raise DataTaskError(f"{where}: labels=int needs class ids 0, 1, 2, ..., got {bad[0]!r}; "
                                "use labels=sorted to number the values")
        ids = np.array([int(float(v)) for v in values], dtype=np.int64)
        names = [str(i) for i in range(int(ids.max()) + 1)]
    else:
        distinct = set(values)
        numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                      for v in distinct)
        names_raw = sorted(distinct) if numeric else sorted(distinct, key=str)
        index = {v: i for i, v in enumerate(names_raw)}
        ids = np.array([index[v] for v in values], dtype=np.int64)
        names = [str(v) for v in names_raw]
    if len(np.unique(ids)) < 2:
        raise DataTaskError(f"{where} has only one class ({names[int(ids[0])]!r}) in "
                            f"{len(ids)} rows; a task needs at least 2")
    return ids, names


def _is_int(value: Any) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number == int(number)
