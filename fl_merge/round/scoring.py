"""Candidates and their scores, for both client levels (docs/protocol.md).

A candidate is theta0 + eta * Delta of one method (eta 0: the base, shared by all methods),
with the client's own per-task parameters. `grids` say which etas each method (label) is
scored at, `splits` on which data. Both protocols end in the same table:

    scores[label][task][split] = {"etas": [...], "accuracy": [...], "loss": [...]}

Grid clients get theta0 + each Delta once + the eta grid in one message and reply lists
running method-major (`grid_config`, `parse_grid_reply`); plain clients get one message per
candidate and split (`plain_requests`, `candidate_state`) and reply one accuracy and loss
each (`assemble_plain`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fl_merge.round.protocol import ACCURACY, CORRECT, LOSS, SPLITS
from fl_merge.core.task_vectors import StateDict, apply_update

Grids = dict[str, list[float]]  # method label -> etas scored
Part = dict[str, dict[str, list[float]]]  # split -> {"etas", "accuracy", "loss"}
Request = tuple[str | None, float, str]  # (method label, None for the base; eta; split)


def validation_plan(labels: Sequence[str], etas: Sequence[float], test_all_etas: bool
                    ) -> tuple[Grids, list[str]]:
    """The first evaluation: every method at every eta on val (and test with test_all_etas)."""
    return {m: list(etas) for m in labels}, (["val", "test"] if test_all_etas else ["val"])


def chosen_plan(best_etas: Mapping[str, float]) -> Grids:
    """The test evaluation: the base and each method's chosen eta only."""
    return {m: [0.0, float(e)] for m, e in best_etas.items()}


def grid_config(grids: Grids, splits: Sequence[str]) -> dict[str, Any]:
    """Config entries of a grid evaluation message (deltas go in label order)."""
    labels = list(grids)
    return {"etas": [e for m in labels for e in grids[m]],
            "etas-per-delta": [len(grids[m]) for m in labels],
            "splits": list(splits), "delta-methods": labels}


def delta_key(i: int) -> str:
    """ArrayRecord key of the i-th method's Delta in a grid message."""
    return "delta" if i == 0 else f"delta-{i}"


def parse_grid_reply(metrics: Mapping[str, Any], grids: Grids, splits: Sequence[str]) -> dict[str, Part]:
    """label -> split -> scores from a grid client's reply metrics ("<split>-accuracy" and
    "<split>-loss" lists, method-major over each method's etas); ValueError saying what is
    missing. An optional "<split>-correct" list (every candidate's 0/1 per example, same
    order) becomes that split's "correct": one list per eta."""
    total = sum(len(g) for g in grids.values())
    for s in splits:
        got = metrics.get(f"{s}-{ACCURACY}")
        if not isinstance(got, list) or len(got) != total:
            wanted = "/".join(f"{x}-accuracy" for x in splits)
            raise ValueError(f"did not score the methods x eta grid (no {wanted} per method and eta)")
    out: dict[str, Part] = {}
    start = 0
    for label, etas in grids.items():
        n = len(etas)
        out[label] = {s: {"etas": list(etas), **{
            k: [float(v) for v in list(metrics.get(f"{s}-{k}", [math.nan] * total))[start:start + n]]
            for k in (ACCURACY, LOSS)}} for s in splits}
        start += n
    for s in splits:
        for label, per_eta in _correct_lists(metrics, s, grids, total).items():
            out[label][s][CORRECT] = per_eta
    return out


def _correct_lists(metrics: Mapping[str, Any], split: str, grids: Grids, total: int
                   ) -> dict[str, list[list[int]]]:
    """label -> per eta the 0/1 list of an optional "<split>-correct" reply entry (empty when
    absent); ValueError when it is not `total` equal slices of 0/1 values."""
    flat = metrics.get(f"{split}-{CORRECT}")
    if flat is None:
        return {}
    flat = list(flat) if isinstance(flat, list) else []
    n = len(flat) // total if total else 0
    if not flat or n * total != len(flat) or any(v not in (0, 1) for v in flat):
        raise ValueError(f"{split}-{CORRECT} must be {total} equal runs of 0/1 values (one per "
                         f"method and eta), got {len(flat)} values")
    runs = [[int(v) for v in flat[i * n:(i + 1) * n]] for i in range(total)]
    out, start = {}, 0
    for label, etas in grids.items():
        out[label] = runs[start:start + len(etas)]
        start += len(etas)
    return out


def plain_requests(grids: Grids, splits: Sequence[str]) -> list[Request]:
    """One request per distinct candidate and split: the base (eta 0) once, each method's
    etas above 0 once each."""
    out: list[Request] = []
    for s in splits:
        if any(0.0 in etas for etas in grids.values()):
            out.append((None, 0.0, s))
        out += [(m, float(e), s) for m, etas in grids.items() for e in etas if e != 0]
    return out


def candidate_state(theta0: Mapping[str, torch.Tensor], per_task: Mapping[str, torch.Tensor],
                    delta: Mapping[str, torch.Tensor] | None, eta: float) -> StateDict:
    """The full model a plain client scores: theta0 + eta * Delta on the merged parameters,
    the client's own per-task parameters beside them (eta 0 or no delta: the base)."""
    base = {**theta0, **per_task}
    return dict(base) if delta is None or eta == 0 else apply_update(base, delta, eta)


def assemble_plain(grids: Grids, splits: Sequence[str],
                   answers: Mapping[Request, tuple[float, float]]) -> dict[str, Part]:
    """label -> split -> scores from one plain client's answers to `plain_requests`."""
    out: dict[str, Part] = {}
    for label, etas in grids.items():
        out[label] = {}
        for s in splits:
            got = [answers[(None, 0.0, s) if e == 0 else (label, float(e), s)] for e in etas]
            out[label][s] = {"etas": list(etas), ACCURACY: [a for a, _ in got], LOSS: [lo for _, lo in got]}
    return out


def plain_answer(metrics: Mapping[str, Any]) -> tuple[float, float]:
    """(accuracy, loss) of a plain evaluate reply: `accuracy` required, `loss` optional
    (nan when absent); ValueError naming what is missing."""
    if ACCURACY not in metrics:
        raise ValueError(f"evaluate reply has no '{ACCURACY}' metric (has {sorted(metrics)})")
    acc = float(metrics[ACCURACY])
    loss = float(metrics[LOSS]) if LOSS in metrics else math.nan
    return acc, loss


def check_splits(splits: Sequence[str]) -> list[str]:
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty list of 'val'/'test', got {list(splits)}")
    return list(splits)


MESSAGE_DELTA_BYTES = 1 << 30  # at most this many bytes of Deltas in one evaluation message


def delta_batches(labels: Sequence[str], delta_bytes: int, budget: int | None = None) -> list[list[str]]:
    """The labels in order, cut into consecutive batches whose Deltas (each `delta_bytes`)
    fit `budget` together, at least one per batch. Each batch is one evaluation message per
    client, sent after the previous batch's replies: a client (and Flower's message copies)
    then hold at most `budget` of Deltas, not every candidate's (24 MiniLM Deltas are 2.2 GB)."""
    per = max(1, (MESSAGE_DELTA_BYTES if budget is None else budget) // max(1, delta_bytes))
    return [list(labels[i:i + per]) for i in range(0, len(labels), per)]
