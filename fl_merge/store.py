"""The sweep store: one tidy results CSV per sweep, appended to by each job, and its queries.

`append_rows` is safe against concurrent jobs and interruption: it takes an exclusive
``fcntl.flock`` on a side lock file (``.<name>.lock``), reads the existing rows, and writes
all rows (old + new, columns the union in order of first appearance) with
`fl_merge.results.atomic_write` (temporary file in the same directory, fsync, rename).
Ctrl-C, SIGKILL or a crash at any point leaves either the old file or the new one, never a
half-written one; rows of completed jobs are never lost. The lock dies with its holder.

Sweep rows are a run's ``results.csv`` rows plus, per job: ``job`` (Hydra job number),
``run_dir`` (relative to the sweep dir), ``overrides`` (the job's command-line overrides,
space separated), one ``ov:<key>`` column per override and ``config_hash`` (a hash of the
resolved run config that defines the results; see `config_hash`).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_merge.results import RESULTS_FILE, atomic_write_text, read_rows

OVERRIDE_PREFIX = "ov:"
# Overrides that pick what is compared, not the setting it is compared in: the report
# groups a sweep's runs by the remaining overrides (seeds are averaged over).
NOT_SETTING = ("method", "method.name", "seed")
# Run-config keys that do not change results (where/how a run executes).
NOT_RESULTS = ("output-dir", "device", "cache", "round-timeout", "connect-timeout")


def _raw_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.exists():
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def append_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Append `rows` to the CSV at `path` atomically (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            columns, existing = _raw_rows(path)
            for r in rows:
                columns.extend(k for k in r if k not in columns)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(existing)
            writer.writerows(rows)
            atomic_write_text(path, buf.getvalue())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def config_hash(run_config: Mapping[str, Any]) -> str:
    """12 hex digits identifying the results-defining part of a Flower run config (dashed
    keys; output dir, device, cache and timeouts left out)."""
    payload = {k: v for k, v in run_config.items() if k not in NOT_RESULTS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def job_rows(run_rows: Iterable[Mapping[str, Any]], job: int, run_dir: str,
             overrides: Sequence[str], chash: str) -> list[dict[str, Any]]:
    """A run's results rows with the job's columns in front."""
    ov = {}
    for item in overrides:
        key, _, value = item.partition("=")
        ov[OVERRIDE_PREFIX + key] = value
    extra = {"job": job, "run_dir": run_dir, "overrides": " ".join(overrides), **ov,
             "config_hash": chash}
    return [{**extra, **r} for r in run_rows]


# --------------------------------------------------------------------------- queries

def setting_items(overrides: str) -> list[str]:
    """A job's overrides minus the method choice and the seed."""
    return [o for o in str(overrides or "").split() if o.partition("=")[0].lstrip("+~") not in NOT_SETTING]


def common_overrides(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Setting overrides every run of the sweep shares (they distinguish nothing)."""
    per_run = {r["run_dir"]: setting_items(r.get("overrides", "")) for r in rows}
    if not per_run:
        return []
    first, *rest = per_run.values()
    return [o for o in first if all(o in other for other in rest)]


def load_sweep(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Tidy rows of a sweep dir (its results.csv with job columns), a run dir (its
    results.csv: one job), or a dir of run dirs (``*/results.csv``: one job each).
    Every row gets ``run_dir`` (absolute) and ``setting``: the overrides that distinguish
    its run (method choice, seed and overrides shared by all runs left out)."""
    directory = Path(directory).resolve()
    path = directory / RESULTS_FILE
    if path.is_file():
        rows = read_rows(path)
        if rows and "config_hash" not in rows[0]:  # a single run
            rows = [{"job": 0, "run_dir": ".", "overrides": "", **r} for r in rows]
    else:
        rows = []
        for i, sub in enumerate(sorted(p.parent for p in directory.glob(f"*/{RESULTS_FILE}"))):
            rows += [{"job": i, "run_dir": sub.name, "overrides": sub.name, **r}
                     for r in read_rows(sub / RESULTS_FILE)]
    if not rows:
        raise ValueError(f"{directory}: no results (no {RESULTS_FILE} here or in its subdirectories)")
    for r in rows:
        r["run_dir"] = str((directory / str(r["run_dir"])).resolve())
    common = common_overrides(rows)
    for r in rows:
        r["setting"] = " ".join(o for o in setting_items(r.get("overrides", "")) if o not in common) \
            or "(all runs)"
    return rows


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _selected(r: Mapping[str, Any]) -> bool:
    return r.get("selected") is True or str(r.get("selected")).lower() == "true"


def setting_scores(rows: Iterable[Mapping[str, Any]], split: str = "test") -> list[dict[str, Any]]:
    """One entry per (method, setting): mean normalized and absolute accuracy over tasks
    and runs (seeds) of the merged model at the eta chosen on validation."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["model"] == "merged" and r["split"] == split and _selected(r):
            groups.setdefault((str(r["method"]), r["setting"]), []).append(r)
    out = []
    for (method, setting), sel in groups.items():
        out.append({
            "method": method, "setting": setting,
            "normalized_accuracy": _mean([r["normalized_accuracy"] for r in sel]),
            "accuracy": _mean([r["accuracy"] for r in sel]),
            "etas": sorted({float(r["eta"]) for r in sel}),
            "runs": len({r["run_dir"] for r in sel}),
        })
    return out


def best_settings(rows: Iterable[Mapping[str, Any]], split: str = "test") -> list[dict[str, Any]]:
    """Per method (in order of first appearance) its best setting by mean normalized
    accuracy; ties go to the first setting seen."""
    best: dict[str, dict[str, Any]] = {}
    for s in setting_scores(rows, split):
        cur = best.get(s["method"])
        if cur is None or s["normalized_accuracy"] > cur["normalized_accuracy"]:
            best[s["method"]] = s
    return list(best.values())


def eta_curve(rows: Iterable[Mapping[str, Any]], method: str, setting: str,
              split: str = "test") -> list[tuple[float, float]]:
    """(eta, mean normalized accuracy over tasks and runs) of one method and setting at
    every eta scored, eta 0 being the base model."""
    by_eta: dict[float, list[float]] = {}
    for r in rows:
        if (str(r["method"]) == method and r["setting"] == setting and r["split"] == split
                and r["model"] in ("merged", "base")):
            by_eta.setdefault(float(r["eta"]), []).append(r["normalized_accuracy"])
    return [(eta, _mean(v)) for eta, v in sorted(by_eta.items())]
