"""predictions.safetensors: per-example test correctness of each method at its chosen eta
and of the base, one uint8 0/1 tensor per (model, task) under the key "<model>/<task>"
(model: a method label, or "base"). Kept out of results.csv, which stays one row per score."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from fl_merge.core.safetensors_writer import save_tensors

PREDICTIONS_FILE = "predictions.safetensors"


def save_predictions(path: Path, predictions: Mapping[str, Mapping[str, list[int]]],
                     etas: Mapping[str, float]) -> None:
    """Write model -> task -> 0/1 list as uint8 tensors (atomically, as every results file);
    metadata records each model's eta."""
    tensors = {f"{model}/{task}": torch.tensor(v, dtype=torch.uint8)
               for model, per_task in predictions.items() for task, v in per_task.items()}
    meta = {"layout": "<model>/<task>: uint8 0/1 per test example, in the client's test order",
            "etas": json.dumps({**{m: float(e) for m, e in etas.items()}, "base": 0.0})}
    save_tensors(path, tensors, meta)


def load_predictions(path: Path) -> dict[str, dict[str, list[int]]]:
    """model -> task -> 0/1 list, as written by `save_predictions`."""
    out: dict[str, dict[str, list[int]]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            model, _, task = key.partition("/")
            out.setdefault(model, {})[task] = f.get_tensor(key).tolist()
    return out
