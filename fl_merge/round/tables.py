"""Results: tidy rows (one per model, eta, task and split scored) and the run's summary."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fl_merge.round.attacks import AttackPlan
from fl_merge.models.evaluation import normalized_accuracy
from fl_merge.io.results import OWN_MODEL, mean
from fl_merge.round.prescreen import PRESCREEN
from fl_merge.round.protocol import CORRECT, FINETUNED_ACCURACY, FINETUNED_LOSS, FINETUNED_VAL_ACCURACY
from fl_merge.round.updates import ClientUpdate
from fl_merge.stats.intervals import bootstrap_ci, ci_line


def _metric(metrics: Mapping[str, Any], key: str) -> float | None:
    return float(metrics[key]) if key in metrics else None


def finetuned_scores(client: ClientUpdate) -> dict[str, float | None]:
    """The client's own fine-tuned model per split, None where it did not report one."""
    return {"val": _metric(client.metrics, FINETUNED_VAL_ACCURACY),
            "test": _metric(client.metrics, FINETUNED_ACCURACY)}


def result_rows(label: str, name: str, params: Mapping[str, Any], best_eta: float | None,
                scores: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
                by_task: Mapping[str, ClientUpdate], plan: AttackPlan,
                knobs: Mapping[str, Any] | None = None, lam: Callable[[float], float] | None = None,
                finetuned: bool = True, own_model: bool = False) -> list[dict[str, Any]]:
    """Rows of one method (one knob setting of it): model is base (eta 0), finetuned (the
    client's own model, when it reported its accuracy; only with `finetuned`) or merged
    (eta > 0; `selected` marks the chosen eta, none when best_eta is None: a setting not
    chosen; never on the prescreen's "val-prescreen" rows). knobs: the setting's searched values (JSON column); lam(eta): the paper's
    lambda of each eta (nan without it). normalized_accuracy is nan where the fine-tuned
    accuracy is unknown. own_model: a personal method (EMR): every row's `own_model` column
    says each task was scored on its own model, not on one shared model."""
    params_json = json.dumps(dict(params), sort_keys=True)
    knobs_json = json.dumps(dict(knobs or {}), sort_keys=True)
    rows = []
    for task, s in scores.items():
        c = by_task[task]
        pid = c.partition_id
        common = {"method": label, "method_name": name, "params": params_json, "knobs": knobs_json,
                  "task": task,
                  "partition_id": pid, "node_id": c.node_id,
                  "attacker": plan.attacks(pid) if pid is not None else False, OWN_MODEL: own_model}
        ft = finetuned_scores(c)
        for split in ("val", "test", PRESCREEN):  # PRESCREEN: a validation subset (prescreen.py)
            ref = ft["val" if split == PRESCREEN else split]
            if ref is not None and finetuned and split != PRESCREEN:
                loss = _metric(c.metrics, FINETUNED_LOSS) if split == "test" else None
                rows.append({**common, "model": "finetuned", "eta": math.nan, "lambda": math.nan,
                             "selected": False,
                             "split": split, "accuracy": ref, "loss": math.nan if loss is None else loss,
                             "finetuned_accuracy": ref, "normalized_accuracy": 1.0})
            got = s.get(split, {"etas": [], "accuracy": [], "loss": []})
            for eta, acc, loss in zip(got["etas"], got["accuracy"], got["loss"]):
                rows.append({**common, "model": "base" if eta == 0 else "merged", "eta": eta,
                             "lambda": lam(eta) if lam is not None else math.nan,
                             "selected": eta == best_eta and split != PRESCREEN, "split": split,
                             "accuracy": acc, "loss": loss,
                             "finetuned_accuracy": math.nan if ref is None else ref,
                             "normalized_accuracy": (math.nan if ref is None
                                                     else normalized_accuracy(acc, ref))})
    return rows


def summary_metrics(rows: Sequence[Mapping[str, Any]], best_etas: Mapping[str, float],
                    best_lambdas: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per method: chosen eta (and lambda, given), mean test accuracy and mean normalized
    accuracy at it; the base's and the fine-tuned models' mean test accuracy (of the first
    method's rows)."""
    labels = list(best_etas)
    test_rows = [r for r in rows if r["split"] == "test"]
    out: dict[str, float] = {}
    for label in labels:
        merged = [r for r in test_rows if r["method"] == label and r["model"] == "merged" and r["selected"]]
        out[f"{label}-eta"] = best_etas[label]
        if best_lambdas is not None:
            out[f"{label}-lambda"] = best_lambdas[label]
        out[f"{label}-test-accuracy"] = mean([r["accuracy"] for r in merged])
        out[f"{label}-normalized-accuracy"] = mean([r["normalized_accuracy"] for r in merged])
    first = [r for r in test_rows if r["method"] == labels[0]] if labels else []
    out["base-test-accuracy"] = mean([r["accuracy"] for r in first if r["model"] == "base"])
    out["finetuned-test-accuracy"] = mean([r["accuracy"] for r in first if r["model"] == "finetuned"])
    return out


REFERENCES = ("task_arithmetic", "fedavg")  # what every method is compared with, first found


def reference_label(methods: Mapping[str, tuple[str, Mapping[str, Any]]]) -> str | None:
    """The label of the first Task Arithmetic method (else the first fedavg): the reference
    of paired differences; None when neither runs."""
    for ref in REFERENCES:
        for label, (name, _) in methods.items():
            if name == ref:
                return label
    return None


def chosen_predictions(scores: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
                       best_etas: Mapping[str, float]
                       ) -> tuple[dict[str, dict[str, list[int]]], list[str]]:
    """(model -> task -> 0/1 per test example, notes): each method at its chosen eta and
    "base" (eta 0), from scores[label][task]["test"]["correct"]. Empty, with a note, unless
    every task scored on test has them for every method (plain clients do not send them)."""
    out: dict[str, dict[str, list[int]]] = {}
    base: dict[str, list[int]] = {}
    missing: set[str] = set()
    for label, eta in best_etas.items():
        for task, part in scores[label].items():
            test = part.get("test", {})
            if not test.get("etas"):
                continue  # not scored on test (left out at the test phase): not in the summary either
            right = dict(zip(test.get("etas", []), test.get(CORRECT, [])))
            if eta not in right:
                missing.add(task)
                continue
            out.setdefault(label, {})[task] = right[eta]
            if 0.0 in right:
                base[task] = right[0.0]
    if base:
        out["base"] = base
    if missing:
        return {}, [f"no per-example test correctness from tasks {sorted(missing)} (plain clients do "
                    "not send test-correct): within-run confidence intervals are absent"]
    return out, []


def choice_origin(label: str, search: Mapping[str, Any], coefficients: Mapping[str, Any],
                  soup: Mapping[str, Any]) -> str:
    """How a method's model was chosen on validation, for the run log: a searched method from
    its candidates (run.json `search`), the learned coefficients as the best of their
    coefficient rounds, the greedy soup from its validation evaluations."""
    per = (search or {}).get("methods", {})
    if label in per:
        return f"chosen on validation from {per[label].get('candidates', '?')} candidate(s)"
    if coefficients and label == f"learned-{coefficients.get('mode')}":
        n = len(coefficients.get("history", []))
        return f"the best on validation (stop halves) of {n} coefficient round(s)"
    if soup and label == "greedy-soup":
        k, tried = len(soup.get("own-validation", [])), len(soup.get("history", []))
        return (f"built on validation: {len(soup.get('members', []))} of {k} models kept, "
                f"{k + max(0, tried - 1)} validation evaluations")
    return "chosen on validation"


def add_references(predictions: dict[str, dict[str, list[int]]],
                   references: Mapping[str, Mapping[str, list[int]]]) -> list[str]:
    """Add the reference models' per-example test correctness (ensemble, best single) to
    `predictions` when they cover exactly its tasks with the same sizes (the paired
    bootstrap needs the same examples); returns a note when they do not."""
    if not references or not predictions:
        return []
    sizes = {t: len(v) for t, v in next(iter(predictions.values())).items()}
    bad = [m for m, per in references.items() if {t: len(v) for t, v in per.items()} != sizes]
    if bad:
        return [f"{', '.join(bad)} scored other test examples than the methods: not in the within-run comparison"]
    predictions.update({m: dict(per) for m, per in references.items()})
    return []


def one_test_set(predictions: Mapping[str, Mapping[str, list[int]]]) -> dict[str, dict[str, list[int]]]:
    """When every model's correctness is the same list on every task (clients of one
    partitioned task scored on its one global test split with one shared head: data=iid,
    shared, ...), keep only the first task: the K copies are one test set, and resampling
    them as K independent sets would shrink the bootstrap CI about sqrt(K)-fold. The mean
    accuracy is unchanged. Anything else is returned as it is."""
    out = {m: dict(per) for m, per in predictions.items()}
    first = {m: next(iter(per.values()), None) for m, per in out.items()}
    if any(len(per) < 2 or any(v != first[m] for v in per.values()) for m, per in out.items()):
        return out
    return {m: dict([next(iter(per.items()))]) for m, per in out.items()}


def comparison_rows(predictions: Mapping[str, Mapping[str, list[int]]], reference: str | None,
                    seed: int = 0) -> list[dict[str, Any]]:
    """One row per model (methods, then base): mean test accuracy over tasks with its 95%
    paired-bootstrap CI over test examples and, with a reference method, the paired
    difference against it with its CI and whether that CI excludes 0 (fl_merge.stats.intervals;
    a raw one-seed fact, uncorrected: `format_comparison` marks nothing with it).
    A test set every client shares counts once (`one_test_set`)."""
    if not predictions:
        return []
    got = bootstrap_ci(one_test_set(predictions), reference, seed=seed)
    rows = []
    for model, r in got.items():
        row = {"model": model, "accuracy": r["accuracy"], "ci_low": r["low"], "ci_high": r["high"]}
        if reference is not None:
            row.update(reference=reference, diff=r["diff"], diff_low=r["diff_low"],
                       diff_high=r["diff_high"], excludes_zero=bool(r["excludes_zero"]))
        rows.append(row)
    return rows


def format_comparison(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison as text: `acc [low, high]` and `diff [low, high]`, no marks. One run is
    one seed: its intervals are over test examples only (training-seed and selection noise
    are not in them) and the differences are not corrected for being several, so nothing is
    marked (issue 27); the rows keep the raw `excludes_zero` fact for whoever counts it."""
    if not rows:
        return ""
    ref = rows[0].get("reference")
    lines = ["test accuracy, one seed: 95% paired bootstrap CI over test examples only "
             "(training-seed and selection noise are not in it)"
             + (f"; difference vs {ref}, uncorrected, no marks" if ref else "")]
    for r in rows:
        diff = (r["diff"], r["diff_low"], r["diff_high"], False) if ref else None
        lines.append(ci_line(r["model"], 20, r["accuracy"], r["ci_low"], r["ci_high"], diff).rstrip())
    return "\n".join(lines)
