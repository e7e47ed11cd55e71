"""The one SGD loop used for pretraining the base and for clients' local fine-tuning."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from fl_merge.methods.fednova import fednova_normaliser


@dataclass
class FitResult:
    steps: int
    first_loss: float  # mean loss over the first few steps
    last_loss: float  # mean loss over the last few steps
    fednova_a: float  # FedNova's normaliser ||a||_1 for the steps and optimizer that ran


def epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatch indices into `n` examples, by epochs of a permutation drawn from `gen`
    when first needed (an epoch's tail shorter than `batch_size` is skipped): `fit`'s order,
    and each task's order in multi-task training (fl_merge/models/multitask.py)."""
    perm, pos = torch.randperm(n, generator=gen), 0
    while True:
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def fit(
    model: nn.Module,
    data: TensorDataset,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    params: list[nn.Parameter] | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    desc: str | None = None,
) -> FitResult:
    """Run exactly `steps` SGD steps on cross-entropy, sampling batches from `data` by epochs
    of a seeded permutation. Only `params` move (default: all). Deterministic given `seed`.

    The optimizer is torch.optim.SGD with heavy-ball `momentum` (no dampening, no Nesterov),
    so the result's `fednova_a` is `fednova_normaliser(steps, momentum)`.
    A progress bar shows when `desc` is given and stderr is a terminal. Batches go to the
    model's device (the data may stay on the CPU).
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    fednova_a = fednova_normaliser(steps, momentum, "sgd")  # also checks momentum, before training
    x, y = data.tensors
    n = len(y)
    bs = min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    model.train()
    window = max(1, min(10, steps // 5))
    losses: list[float] = []
    batches = epoch_batches(n, bs, gen)
    bar = tqdm(total=steps, desc=desc, disable=None if desc else True, leave=False)
    for _ in range(steps):
        idx = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx].to(device)), y[idx].to(device))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))  # one entry per step taken
        bar.update(1)
    bar.close()
    model.eval()
    return FitResult(len(losses), sum(losses[:window]) / window, sum(losses[-window:]) / window,
                     fednova_a)
