"""What `fl-merge report` ranks: the best setting per method inside each group of
comparable runs (`fl_merge.io.store.load_sweep`), chosen on VALIDATION only.

Inside a run the eta of each method is already chosen on validation (``selected`` rows);
across runs the setting (a sweep job's overrides, a loose run's method parameters) is
chosen here by the mean normalized validation accuracy of the merged model at that eta,
and the test accuracy is reported at the chosen setting, never used to choose.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_merge.io.results import RUN_FILE
from fl_merge.io.store import COMPARED, NOT_RESULTS


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _selected(r: Mapping[str, Any]) -> bool:
    return r.get("selected") is True or str(r.get("selected")).lower() == "true"


def setting_scores(rows: Iterable[Mapping[str, Any]], split: str) -> list[dict[str, Any]]:
    """One entry per (group, method, setting): mean normalized and absolute accuracy on
    `split` over tasks and runs (seeds) of the merged model at the eta chosen on val."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["model"] == "merged" and r["split"] == split and _selected(r):
            key = (str(r.get("group", "")), str(r["method"]), str(r["setting"]))
            groups.setdefault(key, []).append(r)
    return [{"group": g, "method": m, "setting": s,
             "normalized_accuracy": _mean([r["normalized_accuracy"] for r in sel]),
             "accuracy": _mean([r["accuracy"] for r in sel]),
             "etas": sorted({float(r["eta"]) for r in sel}),
             "runs": len({r["run_dir"] for r in sel})}
            for (g, m, s), sel in groups.items()]


def best_settings(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per group and method (in order of first appearance) the setting with the best mean
    normalized VALIDATION accuracy (ties: the first seen), with its val and test scores.
    Test never takes part in the choice."""
    test = {(s["group"], s["method"], s["setting"]): s for s in setting_scores(rows, "test")}
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for s in setting_scores(rows, "val"):
        cur = best.get((s["group"], s["method"]))
        if cur is None or s["normalized_accuracy"] > cur["val_normalized_accuracy"]:
            t = test.get((s["group"], s["method"], s["setting"]), {})
            best[(s["group"], s["method"])] = {
                "group": s["group"], "method": s["method"], "setting": s["setting"],
                "val_normalized_accuracy": s["normalized_accuracy"], "val_accuracy": s["accuracy"],
                "test_normalized_accuracy": t.get("normalized_accuracy", math.nan),
                "test_accuracy": t.get("accuracy", math.nan),
                "etas": s["etas"], "runs": s["runs"]}
    return list(best.values())


def eta_curve(rows: Iterable[Mapping[str, Any]], group: str, method: str, setting: str,
              split: str) -> list[tuple[float, float]]:
    """(eta, mean normalized accuracy over tasks and runs) of one method and setting of a
    group at every eta scored, eta 0 being the base model."""
    by_eta: dict[float, list[float]] = {}
    for r in rows:
        if (str(r.get("group", "")) == group and str(r["method"]) == method and r["setting"] == setting
                and r["split"] == split and r["model"] in ("merged", "base")):
            by_eta.setdefault(float(r["eta"]), []).append(r["normalized_accuracy"])
    return [(eta, _mean(v)) for eta, v in sorted(by_eta.items())]


def describe_groups(rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """group -> the run-config values that set it apart from the other groups (from the
    run.json of its first run), e.g. 'num-clients=2 local-steps=15'."""
    configs: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = str(r.get("group", ""))
        if g not in configs:
            try:
                meta = json.loads((Path(r["run_dir"]) / RUN_FILE).read_text())
                configs[g] = dict(meta.get("config") or {})
            except (OSError, ValueError, AttributeError, TypeError):
                configs[g] = {}
    keys = sorted({k for c in configs.values() for k in c} - {*NOT_RESULTS, *COMPARED, "seed"})
    differing = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs.values()}) > 1]
    return {g: " ".join(f"{k}={c.get(k)}" for k in differing) for g, c in configs.items()}
