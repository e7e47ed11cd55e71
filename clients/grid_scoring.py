"""A grid client's scoring (docs/protocol.md "(b) Grid client"): theta0 + eta * Delta for
every Delta and each of its etas, on each asked split. The Deltas come from one message
(ArrayRecords "delta", "delta-1", ...) or, with chunked messages, from node-local files
(clients/chunked.py); the scoring is the same."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fl_merge.models.evaluation import evaluate_examples
from fl_merge.round.prescreen import FRACTION_KEY, first_fraction
from fl_merge.round.protocol import CORRECT
from fl_merge.tasks.registry import TaskData


def eta_grids(config: Mapping[str, Any], num_deltas: int) -> list[list[float]]:
    """The etas to score for each delta: 'etas' is one grid for every delta, or, with
    'etas-per-delta' (one count per delta), consecutive slices: delta i gets the next
    etas-per-delta[i] etas."""
    etas = [float(e) for e in config["etas"]]
    if "etas-per-delta" not in config:
        return [etas] * num_deltas
    counts = [int(n) for n in config["etas-per-delta"]]
    if len(counts) != num_deltas or sum(counts) != len(etas) or min(counts) < 0:
        raise ValueError(f"etas-per-delta {counts} does not split {len(etas)} etas over "
                         f"{num_deltas} deltas")
    starts = [sum(counts[:i]) for i in range(num_deltas)]
    return [etas[a:a + n] for a, n in zip(starts, counts)]


def score_grid(config: Mapping[str, Any], task: TaskData,
               deltas: Sequence[Callable[[], Mapping[str, torch.Tensor]]],
               candidate: Callable[[Mapping[str, torch.Tensor], float], torch.nn.Module]) -> dict[str, Any]:
    """Reply metrics: "<split>-accuracy"/"<split>-loss" lists, delta-major over each delta's
    etas, on config 'splits' (default val and test); with test among them also
    "test-correct", every candidate's 0/1 per test example in that order.
    `candidate(delta, eta)` gives the task's model at theta0 + eta * delta (one model, its
    weights set in place: clients/training.py CandidateModel); `deltas` are loaders, each
    called once, when its turn comes (one Delta converted at a time)."""
    splits = [str(s) for s in config.get("splits", ["val", "test"])]
    bad = [s for s in splits if s not in ("val", "test")]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty list of 'val'/'test', got {splits}")
    grids = eta_grids(config, len(deltas))
    data = {"val": first_fraction(task.val, float(config.get(FRACTION_KEY, 0.0))), "test": task.test}
    scores: dict[str, list[float]] = {f"{s}-{m}": [] for s in splits for m in ("accuracy", "loss")}
    correct: list[int] = []  # test only: per candidate, per example
    # eta = 0 is theta0 whatever the delta: score once
    base: dict[str, tuple[float, float, list[int]]] = {}
    for load, etas in zip(deltas, grids):
        delta = load()
        for eta in etas:
            model = None if eta == 0 and base else candidate(delta, eta)
            for split in splits:
                if eta == 0 and split in base:
                    acc, loss, right = base[split]
                else:
                    acc, loss, right = evaluate_examples(model, data[split])
                    if eta == 0:
                        base[split] = (acc, loss, right)
                scores[f"{split}-accuracy"].append(acc)
                scores[f"{split}-loss"].append(loss)
                if split == "test":
                    correct += right
    metrics: dict[str, Any] = dict(scores)
    if correct:
        metrics[f"test-{CORRECT}"] = correct
    return metrics
