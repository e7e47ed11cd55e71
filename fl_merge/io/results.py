"""A run's outputs: tidy results CSV, merged model (safetensors), run metadata, summary.

All files are written atomically (`fl_merge.core.files.atomic_write`): a reader sees the
old file or the new one, never a half-written one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from fl_merge.core.files import atomic_write_text
from fl_merge.core.values import parse_value
from fl_merge.core.safetensors_writer import save_tensors
from fl_merge.models.evaluation import edge_note

RESULTS_FILE = "results.csv"
MODEL_FILE = "merged.safetensors"
RUN_FILE = "run.json"
LOG_FILE = "run.log"  # the run's console output (fl-merge-run, or the ServerApp under a bare `flwr run`)

def write_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
               extra: Mapping[str, Any] | None = None, columns: Sequence[str] = ()) -> Path:
    """Write rows as CSV, atomically: the one CSV writer (run results, the sweep store, the
    over-seed tables, the experiments' tables). `extra` columns (run id, config) are added
    in front of every row; the header is `columns`, then every other key in order of first
    appearance; a row lacking a column leaves it empty."""
    rows = [{**(extra or {}), **r} for r in rows]
    header = list(dict.fromkeys([*columns, *(k for r in rows for k in r)]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a results CSV back, each cell through `parse_value`: numbers as ints/floats,
    true/false as bool, the rest as text."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: parse_value(v) for k, v in row.items()} for row in csv.DictReader(f)]


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
    save_tensors(path, tensors, meta)  # sorted by name: reply order does not change the bytes


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in name)


def model_file(method_label: str, primary: bool) -> str:
    """merged.safetensors for the run's primary method, merged-<label>.safetensors else."""
    if primary:
        return MODEL_FILE
    return f"merged-{_safe(method_label)}.safetensors"


def personal_model_file(method_label: str, task: str) -> str:
    """A personal method's (EMR's) model of one task: merged-<label>/<task>.safetensors, one
    file per task in merged.safetensors' format (that task's own backbone and its head:
    fl_merge.load_merged(path, task) reads it). Primary or not: such a method has no one
    merged model, so a run whose primary method is personal writes no merged.safetensors."""
    return f"merged-{_safe(method_label)}/{_safe(task)}.safetensors"


# Result rows of a personal method (EMR) carry own_model = true: each task's merged row is
# that task scored on its OWN model (K models, or 1 vector + K masks), not on one shared model.
OWN_MODEL = "own_model"
OWN_MODEL_NOTE = "own model per task"


def own_model_methods(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """The methods whose rows are each task scored on its own model (a personal method)."""
    return {str(r["method"]) for r in rows if _truthy(r.get(OWN_MODEL))}


def method_heading(method: str, eta: float | None, own_model: bool) -> str:
    """A method's column heading in summaries and the report: its chosen eta, and for a
    personal method that each task was scored on its own model."""
    inside = [f"eta={eta:g}"] if eta is not None else []
    inside += [OWN_MODEL_NOTE] if own_model else []
    return f"{method} ({', '.join(inside)})" if inside else method


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
    column per method, its chosen eta in the header (and "own model per task" for a personal
    method such as EMR: not a single-model result); then a warning line per method whose
    chosen eta is at the edge of its grid (`edge_notes`)."""
    rows = list(rows)
    table = summary_rows(rows)
    etas = chosen_etas(rows)
    own = own_model_methods(rows)
    columns = [("base", "base"), ("finetuned", "fine-tuned"),
               *((m, method_heading(m, etas[m], m in own)) for m in etas)]
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
    lines += [f"warning: {note}" for note in edge_notes(rows)]
    return "\n".join(lines)


def edge_notes(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """fl_merge.models.evaluation.edge_note per method of a results table: its chosen eta
    (the selected merged rows) against every eta its chosen setting (same knobs) was scored
    at on validation (the prescreen's rows too: its whole grid)."""
    rows = list(rows)
    chosen = {r["method"]: (float(r["eta"]), r.get("knobs")) for r in rows
              if r["model"] == "merged" and _truthy(r["selected"])}
    notes = []
    for method, (eta, knobs) in chosen.items():
        etas = [float(r["eta"]) for r in rows if r["method"] == method and r.get("knobs") == knobs
                and r["model"] == "merged" and str(r["split"]).startswith("val")]
        notes.append(edge_note(method, eta, etas))
    return [n for n in notes if n]


def mean(values: list[float]) -> float:
    """Arithmetic mean; nan for no values."""
    return sum(values) / len(values) if values else math.nan


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")
