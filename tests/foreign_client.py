"""A ClientApp written only against flwr and torch (no fl_merge import): arbitrary parameter
names (enc.*, cls.*), its own tiny synthetic data, ordinary @app.train / @app.evaluate.

This is what docs/protocol.md calls a plain client: train replies full weights and
num-examples (plus one metric of its own, data-seed); evaluate scores the model it receives
on config "split" (val or test; a client may ignore it) and replies accuracy and loss.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

DIM, HIDDEN, CLASSES = 8, 16, 3
app = ClientApp()


def initial_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The base model theta0 (a test saves it as the run's base checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    return {"enc.w": torch.randn(HIDDEN, DIM, generator=g) * 0.3, "enc.b": torch.zeros(HIDDEN),
            "cls.w": torch.randn(CLASSES, HIDDEN, generator=g) * 0.3, "cls.b": torch.zeros(CLASSES)}


def logits(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ state["enc.w"].T + state["enc.b"])
    return h @ state["cls.w"].T + state["cls.b"]


def dataset(seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: class means drawn from `seed` (one task per seed), examples by split."""
    means = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1000 + seed)) * 1.5
    n, offset = {"train": (300, 0), "val": (90, 1), "test": (90, 2)}[split]
    g = torch.Generator().manual_seed(10 * seed + offset)
    y = torch.arange(n) % CLASSES
    return means[y] + torch.randn(n, DIM, generator=g), y


def score(state: dict[str, torch.Tensor], seed: int, split: str) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `state` on this client's `split`."""
    x, y = dataset(seed, split)
    with torch.no_grad():
        out = logits(state, x)
        return float((out.argmax(1) == y).float().mean()), float(torch.nn.functional.cross_entropy(out, y))


def _seed(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def local_fit(initial: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """40 full-batch SGD steps on this client's training data (deterministic)."""
    state = {k: v.clone().requires_grad_(True) for k, v in initial.items()}
    x, y = dataset(seed, "train")
    opt = torch.optim.SGD(state.values(), lr=0.3)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits(state, x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in state.items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    seed = _seed(context)
    weights = local_fit(msg.content["arrays"].to_torch_state_dict(), seed)
    metrics = {"num-examples": len(dataset(seed, "train")[1]), "data-seed": seed}
    # its own task name (a string: a ConfigRecord, since a MetricRecord holds numbers only)
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics),
                          "meta": ConfigRecord({"task-name": f"blobs-{seed}"})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    split = str(msg.content["config"].get("split", "test"))
    acc, loss = score(msg.content["arrays"].to_torch_state_dict(), _seed(context), split)
    metrics = {"accuracy": acc, "loss": loss, "num-examples": 90}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
