"""Two-stage validation scoring: every candidate on a subset of validation, the finalists on
all of it.

With `prescreen` = f in (0, 1), each client first scores every (setting, eta) candidate on the
first ceil(f * n) of its n validation examples (the validation split is already a random
sample of the task's data, so its first examples are one too). Per method, the `finalists`
best candidates by that subset's selection criterion (mean normalized accuracy, as
fl_merge.round.selection) are then scored on the whole validation split, and the method's
choice is made from those full-validation scores only. Both stages read validation only, so
the selection stays honest; the prescreen can only lose a candidate that the subset ranked
below `finalists` others of its method. Results keep both: split "val-prescreen" rows (the
subset, every candidate) and "val" rows (whole split, finalists only).

Scoring cost per client: C * f + F * M full validation passes (C candidates, M methods, F
finalists) instead of C.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch.utils.data import TensorDataset

from fl_merge.models.evaluation import select_eta

PRESCREEN = "val-prescreen"  # the split name of stage-1 scores in results
FRACTION_KEY = "val-fraction"  # evaluate-message config: score on this fraction of val


def check_prescreen(fraction: float, finalists: int, test_all_etas: bool) -> None:
    """ValueError naming what is wrong: the fraction must be 0 (off) or in (0, 1), at least
    one finalist, and not with test_all_etas (which scores test at every candidate anyway)."""
    if not (fraction == 0 or 0 < fraction < 1) or math.isnan(fraction):
        raise ValueError(f"prescreen must be 0 (off) or a fraction of the validation split in (0, 1), "
                         f"e.g. 0.25; got {fraction}")
    if finalists < 1:
        raise ValueError(f"finalists must be at least 1 (candidates per method scored on the whole "
                         f"validation split after the prescreen), got {finalists}")
    if fraction and test_all_etas:
        raise ValueError("prescreen saves validation scoring, but test-all-etas scores test at every "
                         "candidate anyway: use one of them (prescreen=0 or test-all-etas=false)")


def first_fraction(data: TensorDataset, fraction: float) -> TensorDataset:
    """The first ceil(fraction * n) examples of `data` (at least 1); fraction 0 or >= 1: all."""
    n = len(data)
    if not 0 < fraction < 1:
        return data
    m = max(1, math.ceil(fraction * n))
    return TensorDataset(*(t[:m] for t in data.tensors))


def finalist_grids(scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
                   finetuned_val: Mapping[str, float | None], method_of: Mapping[str, str],
                   finalists: int) -> dict[str, list[float]]:
    """label -> the etas (0, the base, first) of its candidates that are among their method's
    `finalists` best on the prescreen, from scores[label][task]["val"] (the subset's scores).
    The criterion is the round's: mean normalized accuracy, or mean raw accuracy when some
    task's fine-tuned accuracy is missing. Ties go to the earlier label, then the smaller eta
    (as the final choice does). Only eta > 0 competes; labels keep their order."""
    tasks = {t for per_task in scores.values() for t in per_task}
    raw = any(finetuned_val.get(t) is None for t in tasks)
    ranked: dict[str, list[tuple[float, int, float, str]]] = {}
    order = {label: i for i, label in enumerate(scores)}
    for label, per_task in scores.items():
        if not per_task:
            continue
        etas = next(iter(per_task.values()))["val"]["etas"]
        ref = {t: 1.0 if raw else float(finetuned_val[t]) for t in per_task}  # type: ignore[arg-type]
        _, means = select_eta(etas, {t: s["val"]["accuracy"] for t, s in per_task.items()}, ref)
        for eta, value in zip(etas, means):
            if eta > 0:
                ranked.setdefault(method_of[label], []).append((value, order[label], float(eta), label))
    keep: dict[str, set[float]] = {}
    for entries in ranked.values():
        for _, _, eta, label in sorted(entries, key=lambda e: (-e[0], e[1], e[2]))[:finalists]:
            keep.setdefault(label, set()).add(eta)
    return {label: [0.0, *sorted(keep[label])] for label in scores if label in keep}


def combine_stages(prescreen: Mapping[str, Mapping[str, Mapping[str, Any]]],
                   full: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, dict]]:
    """scores[label][task]: the prescreen's "val" as PRESCREEN, and the full-split "val" of the
    finalists (labels without finalists have no "val")."""
    out: dict[str, dict[str, dict]] = {}
    for label, per_task in prescreen.items():
        out[label] = {}
        for task, parts in per_task.items():
            out[label][task] = {PRESCREEN: parts["val"]}
            if task in full.get(label, {}):
                out[label][task]["val"] = full[label][task]["val"]
    return out


def with_full_validation(scores: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The labels (and tasks) that have whole-split "val" scores: what selection reads."""
    out = {label: {t: p for t, p in per_task.items() if "val" in p} for label, per_task in scores.items()}
    return {label: per_task for label, per_task in out.items() if per_task}
