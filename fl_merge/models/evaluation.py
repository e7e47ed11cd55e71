"""Scoring a model on a split, normalized accuracy, choosing eta and whether the chosen eta
sits at the edge of its grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset


def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of `model` on `data` (see `evaluate_examples`)."""
    acc, loss, _ = evaluate_examples(model, data, batch_size)
    return acc, loss


@torch.inference_mode()
def evaluate_examples(model: nn.Module, data: TensorDataset, batch_size: int = 256
                      ) -> tuple[float, float, list[int]]:
    """(accuracy, mean cross-entropy loss, per-example correctness 0/1 in data order) of
    `model` on `data`; accuracy is the mean of the correctness list.

    Batches go to the model's device. batch 256: on one CPU thread the small CNN scores 1000 images ~2x faster than in
    batches of 1024 (the activations stay in cache)."""
    model.eval()
    device = next(model.parameters()).device
    x, y = data.tensors
    correct: list[int] = []
    loss_sum = 0.0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        yb = y[i : i + batch_size].to(device)
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += (logits.argmax(dim=1) == yb).int().cpu().tolist()
    return sum(correct) / len(y), loss_sum / len(y), correct


def normalized_accuracy(merged_accuracy: float, finetuned_accuracy: float) -> float:
    """acc(merged on task t) / acc(model fine-tuned on task t): 1.0 = nothing lost by merging."""
    if finetuned_accuracy <= 0:
        return float("nan")
    return merged_accuracy / finetuned_accuracy


def select_eta(
    etas: Sequence[float],
    val_accuracy: Mapping[str, Sequence[float]],
    finetuned_val_accuracy: Mapping[str, float],
) -> tuple[float, list[float]]:
    """Pick eta maximizing the mean over tasks of normalized validation accuracy.

    val_accuracy[task][j] is the merged model's accuracy with etas[j]; only eta > 0 is a
    candidate (eta = 0 is the pretrained base, kept as the reference). Ties go to the
    smaller eta. Returns (best eta, mean normalized accuracy per eta).
    """
    if not val_accuracy:
        raise ValueError("no validation accuracies to choose eta from")
    means = []
    for j, _ in enumerate(etas):
        vals = [normalized_accuracy(acc[j], finetuned_val_accuracy[t]) for t, acc in val_accuracy.items()]
        means.append(sum(vals) / len(vals))
    candidates = [j for j, e in enumerate(etas) if e > 0] or list(range(len(etas)))
    best = max(candidates, key=lambda j: (means[j], -etas[j]))
    return float(etas[best]), means


def grid_edge(eta: float, etas: Sequence[float]) -> str | None:
    """Where a chosen eta sits in the grid it was chosen from: "largest" (the grid's top),
    "smallest" (its lowest eta above 0; 0 is the base, never chosen) or None (inside the
    grid, or a grid with one eta above 0: nothing was searched)."""
    tried = sorted({float(e) for e in etas if e > 0})
    if len(tried) < 2 or eta not in tried:
        return None
    return "largest" if eta == tried[-1] else "smallest" if eta == tried[0] else None


def edge_note(method: str, eta: float, etas: Sequence[float]) -> str | None:
    """The warning for a method whose eta chosen on validation is at the edge of its grid
    (`grid_edge`): the best eta may lie outside the grid. None inside it."""
    edge = grid_edge(eta, etas)
    if edge is None:
        return None
    tried = sorted({float(e) for e in etas if e > 0})
    beyond = "above" if edge == "largest" else "below"
    return (f"{method}: the chosen eta={eta:g} is the {edge} of the {len(tried)} tried "
            f"({tried[0]:g}..{tried[-1]:g}): the best may lie {beyond} the grid; widen it (lambdas= or etas=)")
