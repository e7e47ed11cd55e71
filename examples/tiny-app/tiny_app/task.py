"""The model, data and training of the example app: plain torch, nothing of fl-merge.

A one-hidden-layer MLP with parameters enc.* (the shared encoder, merged) and cls.* (each
client's own classifier, kept per task). Client i's task is 3 Gaussian blobs in 8 dimensions
with class means drawn from seed i and a noise level that grows with i (lo, mid, hi).
"""

from __future__ import annotations

import torch

DIM, HIDDEN, CLASSES = 8, 16, 3
SIZES = {"train": 300, "val": 90, "test": 90}


def base_weights() -> dict[str, torch.Tensor]:
    """theta0, the model every client starts from (the app's base-checkpoint names this)."""
    g = torch.Generator().manual_seed(0)
    return {"enc.w": torch.randn(HIDDEN, DIM, generator=g) * 0.3, "enc.b": torch.zeros(HIDDEN),
            "cls.w": torch.randn(CLASSES, HIDDEN, generator=g) * 0.3, "cls.b": torch.zeros(CLASSES)}


def logits(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ state["enc.w"].T + state["enc.b"])
    return h @ state["cls.w"].T + state["cls.b"]


def dataset(task: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Client `task`'s examples of `split` (train, val or test), fixed by its seeds."""
    means = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1000 + task)) * 1.5
    n, offset = SIZES[split], ("train", "val", "test").index(split)
    g = torch.Generator().manual_seed(10 * task + offset)
    y = torch.arange(n) % CLASSES
    return means[y] + (0.8 + 0.4 * task) * torch.randn(n, DIM, generator=g), y


def score(state: dict[str, torch.Tensor], task: int, split: str) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `state` on client `task`'s `split`."""
    x, y = dataset(task, split)
    with torch.no_grad():
        out = logits(state, x)
        return float((out.argmax(1) == y).float().mean()), float(torch.nn.functional.cross_entropy(out, y))


def fit(initial: dict[str, torch.Tensor], task: int, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """`steps` full-batch SGD steps on client `task`'s training data (deterministic)."""
    state = {k: v.clone().requires_grad_(True) for k, v in initial.items()}
    x, y = dataset(task, "train")
    opt = torch.optim.SGD(state.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits(state, x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in state.items()}
