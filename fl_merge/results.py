"""A run's outputs: tidy results CSV, merged model (safetensors), run metadata, summary.

All files are written atomically (temporary file, then rename): an interrupted run never
leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

RESULTS_FILE = "results.csv"
MODEL_FILE = "merged.safetensors"
RUN_FILE = "run.json"


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    _atomic_write(path, lambda p: p.write_text(buf.getvalue()))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a results CSV back, numbers as floats/ints and booleans as bool."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def save_merged_model(path: Path, backbone: Mapping[str, torch.Tensor],
                      heads: Mapping[str, Mapping[str, torch.Tensor]], metadata: Mapping[str, Any]) -> None:
    """One safetensors file: the merged backbone under its own keys and each task's head
    under ``heads.<task>.<param>``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in backbone.items()}
    for task, head in heads.items():
        for k, v in head.items():
            tensors[f"heads.{task}.{k.removeprefix('head.')}"] = v.detach().contiguous().cpu()
    meta = {k: str(v) for k, v in metadata.items()}
    _atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str)))


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

        def fmt(key: str) -> str:
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
