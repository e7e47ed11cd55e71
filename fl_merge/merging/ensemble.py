"""The prediction ensemble of the K clients' fine-tuned models: a reference model beside the
weight average (DiWA's "ENS"; Rame et al., NeurIPS 2022, "Diverse Weight Averaging for
Out-of-Distribution Generalization", who compare weight averaging with the functional
ensemble of the same runs; deep ensembles: Lakshminarayanan et al., NeurIPS 2017).

For input x, with f(theta, x) the logits of the model with weights theta (the scoring
client's own head), the ensemble's class distribution is the mean of the K members' softmax

    p_ens(y | x) = (1/K) sum_i softmax(f(theta0 + tau_i, x))_y,

its prediction argmax_y p_ens(y | x) and its loss the mean of -log p_ens(y_true | x). It
costs K forward passes per example (the weight average: one), which is why weight averaging
is the interesting model and the ensemble its reference.

Also the best single run: the member with the highest validation criterion over the
scoring clients (`best_member`), chosen on validation only.

Pure functions; the federated phase is strategies/ensemble_phase.py (server) and
clients/ensemble.py (client).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset


@torch.inference_mode()
def member_logits(model: nn.Module, data: TensorDataset, batch_size: int = 256) -> torch.Tensor:
    """The model's logits on every example of `data`, in data order (float32 [n, C], CPU)."""
    model.eval()
    device = next(model.parameters()).device
    x = data.tensors[0]
    out = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def mean_probabilities(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """p_ens = (1/K) sum_i softmax(logits_i) over the K members' logits ([n, C] each), in
    float64 [n, C]."""
    if not logits:
        raise ValueError("an ensemble needs at least one member's predictions")
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members must predict the same examples and classes, got shapes "
                         f"{sorted(shapes)}")
    return torch.stack([torch.softmax(z.double(), dim=1) for z in logits]).mean(0)


def probability_scores(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, list[int]]:
    """(accuracy, mean negative log-likelihood, 0/1 correctness per example) of class
    probabilities `probs` [n, C] against `labels` [n]; a zero probability of the true class
    gives an infinite loss."""
    if probs.shape[0] != len(labels) or not len(labels):
        raise ValueError(f"need one probability row per label (at least one), got {probs.shape[0]} rows "
                         f"and {len(labels)} labels")
    y = labels.long()
    correct = (probs.argmax(dim=1) == y).int().tolist()
    true_p = probs[torch.arange(len(y)), y]
    nll = float(-torch.log(true_p).mean()) if bool((true_p > 0).all()) else math.inf
    return sum(correct) / len(y), nll, correct


def best_member(scores: Sequence[float]) -> int:
    """Index of the member with the highest validation score (ties: the lower index); NaN
    scores never win."""
    ok = [i for i, s in enumerate(scores) if not math.isnan(float(s))]
    if not ok:
        raise ValueError(f"no member has a validation score, got {list(scores)}")
    return max(ok, key=lambda i: (float(scores[i]), -i))
