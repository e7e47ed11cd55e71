"""A run's outputs: tidy results CSV, merged model (safetensors), run metadata, summary.

All files are written atomically by `atomic_write`: a temporary file in the target's
directory, flushed to disk (fsync), then renamed over the target (and the directory entry
fsync'd). A run interrupted at any point (Ctrl-C, SIGKILL, a crash) leaves the old file or
the new one, never a half-written or empty one. Temporary files are hidden
(``.<name>.tmp-<host>-<pid>-<random>``), so nothing that reads results or cache entries
ever picks one up; one left behind by a killed writer is removed by the next write to the
same directory.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

RESULTS_FILE = "results.csv"
MODEL_FILE = "merged.safetensors"
RUN_FILE = "run.json"

# A temp file of another host (shared directory) is only presumed dead after this long.
STALE_TEMP_SECONDS = 3600.0
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
# ".<name>.tmp-<host>-<pid>-<hex>"; also the older ".<name>.tmp<pid>" some writers use.
_TEMP_RE = re.compile(r"^\..+\.tmp(?:-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]+|(?P<old>\d+))$")


def temp_path(path: Path) -> Path:
    """A fresh hidden temporary name next to `path` (unique per host, process and call)."""
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp(name: str) -> bool:
    """Whether a file name is one of our (or an older writer's) temporary files."""
    return _TEMP_RE.match(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temporary files in `directory` left by writers that died mid-write: those of
    a dead process on this host, and any older than STALE_TEMP_SECONDS. Returns them."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None:
            continue
        pid = int(m["pid"] or m["old"])
        ours = m["old"] is not None or m["host"] == _HOST
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
            if old or (ours and not _pid_alive(pid)):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone already (another cleaner), or not ours to remove
            continue
    return removed


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # a platform that cannot open directories: nothing to sync
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write `path` atomically: `write(tmp)` fills a temporary file in the same directory,
    which is fsync'd and renamed over `path`; then the directory is fsync'd, so after a
    crash `path` is the old content or the new one, whole. Stale temporary files of dead
    writers in that directory are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_path(path)
    try:
        write(tmp)
        _fsync(tmp)  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent, directory=True)  # the rename itself survives a crash
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8, newlines as given)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def write_rows(path: Path, rows: list[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> None:
    """Write tidy rows as CSV; `extra` columns (run id, config) are added to every row."""
    rows = [{**(extra or {}), **r} for r in rows]
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a results CSV back, numbers as floats/ints and booleans as bool."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


# What merged.safetensors' metadata may hold: only what config and seeds fix, so two runs of one
# config write the same bytes. Run ids, times and hosts belong in run.json.
MERGED_FIELDS = ("eta", "method", "model", "params", "tasks")
MERGED_METADATA_KEY = "fl_merge"


def merged_metadata(fields: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors header metadata for a merged model: ONE key holding the fields as JSON
    with sorted keys (safetensors writes a metadata map in a random order, so several keys
    would give different bytes each time). Raises ValueError on a field outside MERGED_FIELDS
    or a value JSON cannot write exactly (e.g. a datetime)."""
    extra = sorted(set(fields) - set(MERGED_FIELDS))
    if extra:
        raise ValueError(f"merged model metadata may hold only {', '.join(MERGED_FIELDS)} (fixed by "
                         f"config and seeds), got {extra}: run ids and times belong in {RUN_FILE}")
    try:
        text = json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"merged model metadata must be plain JSON values (str, number, bool, "
                         f"list, dict): {e}") from None
    return {MERGED_METADATA_KEY: text}


def save_merged_model(path: Path, backbone: Mapping[str, torch.Tensor],
                      heads: Mapping[str, Mapping[str, torch.Tensor]], metadata: Mapping[str, Any]) -> None:
    """One safetensors file: the merged backbone under its own keys and each task's head
    under ``heads.<task>.<param>``; `metadata` as `merged_metadata` checks it. The same
    tensors and metadata always give the same bytes (fl_merge.load_merged reads it back)."""
    meta = merged_metadata(metadata)
    tensors = {k: v.detach().contiguous().cpu() for k, v in backbone.items()}
    for task, head in heads.items():
        for k, v in head.items():
            tensors[f"heads.{task}.{k.removeprefix('head.')}"] = v.detach().contiguous().cpu()
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def model_file(method_label: str, primary: bool) -> str:
    """merged.safetensors for the run's primary method, merged-<label>.safetensors else."""
    if primary:
        return MODEL_FILE
    safe = "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in method_label)
    return f"merged-{safe}.safetensors"


def summary_rows(rows: Iterable[Mapping[str, Any]], split: str = "test") -> list[dict[str, Any]]:
    """Per task: base and fine-tuned accuracy and, per method, the merged accuracy at its
    chosen eta; then a 'mean' row and a 'normalized' row (mean normalized accuracy)."""
    table: dict[str, dict[str, Any]] = {}
    normalized: dict[str, list[float]] = {}
    for r in rows:
        if r["split"] != split:
            continue
        t = table.setdefault(r["task"], {"task": r["task"]})
        if r["model"] == "base":
            t["base"] = r["accuracy"]
        elif r["model"] == "finetuned":
            t["finetuned"] = r["accuracy"]
        elif r["model"] == "merged" and _truthy(r["selected"]):
            t[r["method"]] = r["accuracy"]
            normalized.setdefault(r["method"], []).append(r["normalized_accuracy"])
    out = list(table.values())
    if out:
        keys = ["base", "finetuned", *normalized]
        out.append({"task": "mean", **{k: mean([t[k] for t in out if k in t]) for k in keys}})
        out.append({"task": "normalized", "finetuned": 1.0,
                    **{m: mean(v) for m, v in normalized.items()}})
    return out


def chosen_etas(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    return {r["method"]: r["eta"] for r in rows if r["model"] == "merged" and _truthy(r["selected"])}


def format_summary(rows: Iterable[Mapping[str, Any]], title: str = "") -> str:
    """A plain-text table of `summary_rows` (readable in logs and terminals alike): one
    column per method, its chosen eta in the header."""
    rows = list(rows)
    table = summary_rows(rows)
    etas = chosen_etas(rows)
    columns = [("base", "base"), ("finetuned", "fine-tuned"),
               *((m, f"{m} (eta={etas[m]:g})") for m in etas)]
    widths = [max(10, len(h) + 2) for _, h in columns]
    lines = [title] if title else []
    lines.append(f"{'task':<16}" + "".join(f"{h:>{w}}" for (_, h), w in zip(columns, widths)))
    for t in table:
        if t["task"] == "mean":
            lines.append("-" * (16 + sum(widths)))

        def fmt(key: str, t: Mapping[str, Any] = t) -> str:
            v = t.get(key)
            return f"{v:.3f}" if isinstance(v, (int, float)) and not math.isnan(v) else "-"

        lines.append(f"{t['task']:<16}" + "".join(f"{fmt(k):>{w}}" for (k, _), w in zip(columns, widths)))
    return "\n".join(lines)


def mean(values: list[float]) -> float:
    """Arithmetic mean; nan for no values."""
    return sum(values) / len(values) if values else math.nan


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def _parse(v: str) -> Any:
    if v in ("True", "False"):
        return v == "True"
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v
