"""The prediction-ensemble phase of a round (`ensemble=true`; the math is fl_merge.merging.ensemble).

Where the predictions are made: at the clients that hold the evaluation data. The server
sends each client ONE message (type "evaluate.ensemble") carrying theta0 with the client's
own per-task parameters and the K task vectors; the client builds the K members theta0 +
tau_i, averages their softmax on its validation and test examples and replies the
ensemble's accuracy, loss and per-example test correctness, and each member's validation
accuracy and per-example test correctness (for the best single run, chosen by the server
on validation). Why this way: the examples never leave the client (the alternative, each
member's owner predicting on everyone's data, moves the data); the per-example class
probabilities never travel either (n x C x K numbers per client); the price is K model-sized
vectors down per client once, as in the learned-coefficient phase's first message (every
client sees every task vector; run.json `ensemble.bytes` records what was sent).

The ensemble has nothing to choose, so it is scored on validation and test in the same
message. The best single run is the member with the best validation criterion (mean
normalized accuracy over the clients, the round's criterion); only its test correctness is
kept. Neither touches the merged methods' choices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fl_merge.merging.ensemble import best_member
from fl_merge.models.evaluation import normalized_accuracy
from fl_merge.round.protocol import ACCURACY, CORRECT, LOSS

ACTION = "ensemble"  # message type "evaluate.ensemble" (a Flower action of evaluate)
MEMBER_PREFIX = "member-"  # ArrayRecord keys "member-0", ... : the K task vectors
MEMBERS = "ensemble-members"  # config: K
MEMBER_ACCURACY = "member-val-accuracy"  # reply: each member's validation accuracy (K)
MEMBER_CORRECT = "member-test-correct"  # reply: each member's 0/1 per test example, member-major
ENSEMBLE_LABEL, SINGLE_LABEL = "ensemble", "best-single"  # method labels in results
ENSEMBLE_MODEL, SINGLE_MODEL = "ensemble", "single"  # the `model` column of their rows


def request_config(num_members: int) -> dict[str, Any]:
    """The config entries of the ensemble message."""
    return {MEMBERS: int(num_members), "splits": ["val", "test"]}


def parse_reply(metrics: Mapping[str, Any], k: int) -> dict[str, Any]:
    """A client's ensemble reply as {"val": {accuracy, loss}, "test": {accuracy, loss,
    correct}, "member-val": [K accuracies], "member-test-correct": [K lists]}; ValueError
    naming what is missing or malformed."""
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        key = f"{split}-{ACCURACY}"
        if key not in metrics:
            raise ValueError(f"ensemble reply has no '{key}'")
        out[split] = {ACCURACY: float(metrics[key]), LOSS: float(metrics.get(f"{split}-{LOSS}", math.nan))}
    correct = list(metrics.get(f"test-{CORRECT}", []))
    members = list(metrics.get(MEMBER_ACCURACY, []))
    flat = list(metrics.get(MEMBER_CORRECT, []))
    n = len(correct)
    if not n or any(v not in (0, 1) for v in correct):
        raise ValueError(f"ensemble reply needs 'test-{CORRECT}', 0/1 per test example")
    if len(members) != k or len(flat) != k * n or any(v not in (0, 1) for v in flat):
        raise ValueError(f"ensemble reply needs '{MEMBER_ACCURACY}' ({k} values) and '{MEMBER_CORRECT}' "
                         f"({k} x {n} 0/1 values), got {len(members)} and {len(flat)}")
    out["test"][CORRECT] = [int(v) for v in correct]
    out["member-val"] = [float(v) for v in members]
    out["member-test-correct"] = [[int(v) for v in flat[i * n:(i + 1) * n]] for i in range(k)]
    return out


def member_criterion(member_val: Mapping[str, Sequence[float]],
                     finetuned_val: Mapping[str, float | None]) -> list[float]:
    """Per member i: mean over tasks t of its validation accuracy on t normalized by t's
    fine-tuned validation accuracy (the round's criterion; raw accuracy when any task lacks
    it, as fl_merge.round.selection does)."""
    tasks = list(member_val)
    k = len(next(iter(member_val.values()))) if tasks else 0
    raw = any(finetuned_val.get(t) is None for t in tasks)
    def norm(acc: float, t: str) -> float:
        return acc if raw else normalized_accuracy(acc, float(finetuned_val[t]))  # type: ignore[arg-type]
    return [sum(norm(member_val[t][i], t) for t in tasks) / len(tasks) for i in range(k)]


def outcome(replies: Mapping[str, Mapping[str, Any]], finetuned_val: Mapping[str, float | None],
            member_names: Sequence[str]) -> dict[str, Any]:
    """From task -> parsed reply: the best single run (chosen on validation only) and the
    per-task scores of the two reference models: {"best": index, "criterion": [...],
    "scores": {label: {task: {"val": {...}, "test": {...}}}}}."""
    crit = member_criterion({t: r["member-val"] for t, r in replies.items()}, finetuned_val)
    best = best_member(crit)
    single = {}
    for t, r in replies.items():
        right = r["member-test-correct"][best]
        single[t] = {"val": {ACCURACY: r["member-val"][best], LOSS: math.nan},
                     "test": {ACCURACY: sum(right) / len(right), LOSS: math.nan, CORRECT: right}}
    return {"best": best, "best-name": member_names[best], "criterion": crit,
            "scores": {ENSEMBLE_LABEL: {t: {"val": r["val"], "test": r["test"]} for t, r in replies.items()},
                       SINGLE_LABEL: single}}


def reference_rows(scores: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
                   common: Mapping[str, Mapping[str, Any]], params: Mapping[str, Mapping[str, Any]]
                   ) -> list[dict[str, Any]]:
    """results.csv rows of the reference models: label -> task -> split -> scores, with
    `common[task]` (task, partition_id, node_id, attacker, finetuned accuracy per split) and
    per label its params. model is "ensemble" or "single", selected True (nothing to choose
    beyond the best single run, chosen on validation), eta and lambda NaN."""
    import json

    rows = []
    for label, per_task in scores.items():
        model = ENSEMBLE_MODEL if label == ENSEMBLE_LABEL else SINGLE_MODEL
        for task, per_split in per_task.items():
            c = common[task]
            for split in ("val", "test"):
                got = per_split[split]
                ref = c.get(f"finetuned-{split}")
                rows.append({
                    "method": label, "method_name": label.replace("-", "_"),
                    "params": json.dumps(dict(params.get(label, {})), sort_keys=True), "knobs": "{}",
                    "task": task, "partition_id": c["partition_id"], "node_id": c["node_id"],
                    "attacker": c["attacker"], "model": model, "eta": math.nan, "lambda": math.nan,
                    "selected": True, "split": split, "accuracy": got[ACCURACY], "loss": got[LOSS],
                    "finetuned_accuracy": math.nan if ref is None else ref,
                    "normalized_accuracy": math.nan if ref is None else normalized_accuracy(got[ACCURACY], ref)})
    return rows
