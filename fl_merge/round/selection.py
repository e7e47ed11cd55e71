"""Select eta on validation: by mean normalized accuracy, or by mean raw accuracy when some
client did not report its fine-tuned validation accuracy (the results say which)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fl_merge.models.evaluation import edge_note, select_eta
from fl_merge.round.outcome import MergeRound
from fl_merge.core.task_vectors import StateDict

# method label -> (chosen candidate label, its eta, its validation criterion value)
Choice = dict[str, tuple[str, float, float]]

NORMALIZED = "mean normalized validation accuracy"
RAW = "mean validation accuracy"


def choose_etas(scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
                finetuned_val: Mapping[str, float | None]) -> tuple[dict[str, float], str, list[str]]:
    """(label -> chosen eta, criterion, notes). scores[label][task]["val"] holds "etas" and
    "accuracy"; finetuned_val[task] is the client's fine-tuned validation accuracy or None.
    Only eta > 0 is a candidate; ties go to the smaller eta (fl_merge.models.evaluation.select_eta)."""
    tasks = sorted({t for per_task in scores.values() for t in per_task})
    lacking = [t for t in tasks if finetuned_val.get(t) is None]
    notes = []
    if lacking:
        notes.append(f"{', '.join(lacking)} sent no finetuned-val-accuracy: eta chosen by {RAW}, "
                     "normalized accuracy not reported")
    best: dict[str, float] = {}
    for label, per_task in scores.items():
        if not per_task:
            continue
        etas = next(iter(per_task.values()))["val"]["etas"]
        val = {t: s["val"]["accuracy"] for t, s in per_task.items()}
        # Raw accuracy is normalized accuracy with every fine-tuned accuracy set to 1.
        ref = {t: 1.0 if lacking else float(finetuned_val[t]) for t in per_task}  # type: ignore[arg-type]
        best[label], _ = select_eta(etas, val, ref)
    return best, RAW if lacking else NORMALIZED, notes


def choose_settings(scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
                    finetuned_val: Mapping[str, float | None], method_of: Mapping[str, str]
                    ) -> tuple[Choice, str, list[str]]:
    """Per method: (chosen candidate, its eta, its mean normalized validation accuracy), the
    criterion and notes. scores[candidate][task]["val"] as in `choose_etas`; method_of maps
    each candidate to its method. Each candidate's eta is chosen as `choose_etas` does; the
    method then takes the candidate with the best mean (ties: the earlier candidate, i.e. the
    first setting in grid order). Only validation scores are read."""
    best_etas, criterion, notes = choose_etas(scores, finetuned_val)
    tasks = sorted({t for per_task in scores.values() for t in per_task})
    lacking = [t for t in tasks if finetuned_val.get(t) is None]
    out: dict[str, tuple[str, float, float]] = {}
    for cand, eta in best_etas.items():
        per_task = scores[cand]
        etas = next(iter(per_task.values()))["val"]["etas"]
        ref = {t: 1.0 if lacking else float(finetuned_val[t]) for t in per_task}  # type: ignore[arg-type]
        _, means = select_eta(etas, {t: s["val"]["accuracy"] for t, s in per_task.items()}, ref)
        value = means[list(etas).index(eta)]
        method = method_of[cand]
        if method not in out or value > out[method][2]:
            out[method] = (cand, eta, value)
    return out, criterion, notes


def apply_choice(r: MergeRound, choice: Choice, deltas: Mapping[str, StateDict]) -> None:
    """Record each method's choice in the round: its eta, the chosen setting's full
    parameters, run.json's choice record (candidate, knobs, lambda in its paper's units, eta,
    validation value) and its Delta. r.candidates[label] must be the chosen candidates."""
    k = len(r.clients)
    for m, (label, eta, value) in choice.items():
        c = r.candidates[label]
        r.best_etas[m] = eta
        r.methods[m] = (c.name, c.params)
        r.choices[m] = {"candidate": label, "knobs": c.knobs, "lambda": c.lam(eta, k), "eta": eta,
                        "validation": value}
    r.deltas = {m: deltas[label] for m, (label, _, _) in choice.items()}


def edge_notes(choice: Choice, grids: Mapping[str, Sequence[float]]) -> list[str]:
    """One warning per method whose eta chosen on validation is the largest or the smallest
    of its chosen candidate's grid (`grids`: candidate label -> its etas): the best eta may
    lie outside what was tried (fl_merge.models.evaluation.edge_note)."""
    notes = [edge_note(method, eta, grids[label]) for method, (label, eta, _) in choice.items()]
    return [n for n in notes if n]
