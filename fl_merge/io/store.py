"""The sweep store: one tidy results CSV per sweep, appended to by each job, and its queries.

`append_rows` is safe against concurrent jobs and interruption: it takes an exclusive
``fcntl.flock`` on a side lock file (``.<name>.lock``), reads the existing rows, and writes
all rows (old + new, columns the union in order of first appearance) with
`fl_merge.io.results.write_rows`, the one CSV writer (temporary file in the same directory,
fsync, rename). Ctrl-C, SIGKILL or a crash at any point leaves either the old file or the new one, never a
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
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_merge.io.results import RESULTS_FILE, RUN_FILE, read_rows, write_rows

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
            write_rows(path, [*existing, *rows], columns=columns)
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


def _is_store(path: Path) -> bool:
    """A sweep's results.csv (job columns), not one run's."""
    with open(path, newline="", encoding="utf-8") as f:
        return "config_hash" in (next(csv.reader(f), None) or [])


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's Flower run config from its run.json (None without one)."""
    try:
        config = json.loads((run_dir / RUN_FILE).read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return dict(config) if isinstance(config, dict) else None


def context_key(config: Mapping[str, Any] | None) -> str:
    """What must be equal for two loose runs to be compared: their run config without the
    compared choice (method, method-params), the replicate (seed) and what does not change
    results (NOT_RESULTS). JSON text; "" for a run without run.json."""
    if config is None:
        return ""
    keep = {k: v for k, v in config.items()
            if k not in (*NOT_RESULTS, *COMPARED, "seed")}
    return json.dumps(keep, sort_keys=True, default=str)


# The run-config keys a report compares inside a group of loose runs (not a context).
COMPARED = ("method", "method-params")


def find_results(directory: Path) -> list[Path]:
    """Every results.csv at any depth under `directory` that is a sweep store or a run not
    inside a sweep store's tree (a store's job dirs are read through the store)."""
    found = sorted(p for p in directory.rglob(RESULTS_FILE) if p.is_file()
                   and "report" not in p.relative_to(directory).parts[:-1])
    stores = [p.parent for p in found if _is_store(p)]
    return [p for p in found if _is_store(p)
            or not any(s in p.parents for s in stores)]


def load_sweep(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Tidy rows of every run at any depth under `directory`: sweep stores (a Hydra
    multirun's results.csv with job columns) and single runs (a results.csv, e.g. a Hydra
    run's ``outputs/<date>/<time>``). Every row gets ``run_dir`` (absolute), ``group`` and
    ``setting``:

    * ``group``: which runs may be compared. The jobs of one sweep form one group (they
      differ only in the swept keys); loose runs are grouped by their run config minus the
      method, its parameters, the seed and the keys that do not change results
      (`context_key`), so runs with another K or other local steps are never ranked together.
    * ``setting``: what distinguishes a run inside its group: a sweep job's overrides (method
      choice, seed and overrides shared by all jobs left out); a loose run's method-params.
    """
    directory = Path(directory).resolve()
    rows: list[dict[str, Any]] = []
    loose: list[tuple[Path, list[dict[str, Any]]]] = []
    for path in find_results(directory):
        where = path.parent
        rel = str(where.relative_to(directory)) if where != directory else "."
        if _is_store(path):
            sweep = read_rows(path)
            for r in sweep:
                r["run_dir"] = str((where / str(r["run_dir"])).resolve())
                r["group"] = f"sweep {rel}"
            common = common_overrides(sweep)
            for r in sweep:
                r["setting"] = " ".join(o for o in setting_items(r.get("overrides", ""))
                                        if o not in common) or "(all runs)"
            rows += sweep
        else:
            loose.append((where, read_rows(path)))
    contexts: dict[str, int] = {}
    for i, (where, run_rows) in enumerate(loose):
        config = _run_config(where)
        key = context_key(config) or f"(no {RUN_FILE}) {where}"
        n = contexts.setdefault(key, len(contexts))
        params = str((config or {}).get("method-params") or "")
        for r in run_rows:
            rows.append({"job": i, "overrides": "", **r, "run_dir": str(where),
                         "group": f"runs {n + 1}",
                         "setting": f"method-params={params}" if params else "(all runs)"})
    if not rows:
        raise ValueError(f"{directory}: no results (no {RESULTS_FILE} here or at any depth below)")
    return rows
