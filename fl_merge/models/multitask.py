"""Multi-task training on the union of the clients' data: the reference the one-shot merge is
measured against (the "one-shot FL gap", issue 27 item 4).

This is the "multi-task" baseline of model-merging papers: ONE model trained jointly on all
tasks' training data (Ilharco et al., "Editing models with task arithmetic", ICLR 2023, the
multi-task row of their Table; the same row in TIES, AdaMerging, ...), the upper reference a
merge of K independently fine-tuned models is compared with. Here, as in fl-merge's clients,
only the shared backbone trains: each task keeps the frozen head its client used (the linear
probe fitted on theta0's features, clients/training.py `fit_probe_head`), so the multi-task,
fine-tuned and merged backbones are scored through the same heads.

fl_merge.models sits below fl_merge.tasks, so tasks are taken duck-typed (anything with
``.train``, ``.val``, ``.test`` TensorDatasets and ``.num_classes``, e.g.
fl_merge.tasks.registry.TaskData) and the heads come in as arguments (the caller fits them).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from fl_merge.models.evaluation import evaluate
from fl_merge.models.registry import MERGED_PREFIX
from fl_merge.models.training import epoch_batches


class TaskSplits(Protocol):
    """What multi-task training reads of a task (fl_merge.tasks.registry.TaskData has it)."""

    num_classes: int
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


@dataclass
class MultitaskResult:
    state: dict[str, torch.Tensor]  # the trained backbone, keys "backbone.*" as in TaskModel
    steps: int  # SGD steps taken; each saw one minibatch of every task
    first_loss: float  # mean over tasks of the loss, averaged over the first few steps
    last_loss: float  # the same over the last few steps
    task_last_loss: list[float] = field(default_factory=list)  # per task, last few steps


def default_multitask_steps(local_steps: Sequence[int]) -> int:
    """The default budget: round(mean of the clients' local steps) joint steps.

    Every joint step draws one minibatch of each of the K tasks, so K * mean(s_i) = sum_i s_i:
    multi-task training sees as many minibatches (and gradient evaluations) as all the clients
    together, i.e. what centralised training of the same total compute would reach."""
    steps = [int(s) for s in local_steps]
    if not steps or min(steps) <= 0:
        raise ValueError(f"default_multitask_steps needs the clients' positive local steps "
                         f"(one per client), got {list(local_steps)}")
    return max(1, round(sum(steps) / len(steps)))


def _check(heads: Sequence[nn.Module], tasks: Sequence[TaskSplits], steps: int, lr: float,
           batch_size: int, momentum: float) -> None:
    """One ValueError line naming what is wrong and what would be right."""
    where = "train_multitask"
    if len(tasks) == 0:
        raise ValueError(f"{where}: no tasks (K=0); give at least one task and its frozen head")
    if len(heads) != len(tasks):
        raise ValueError(f"{where}: {len(heads)} heads for {len(tasks)} tasks; give one frozen "
                         f"head per task, in task order")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"{where}: steps must be a positive int (joint SGD steps, each seeing "
                         f"every task; default_multitask_steps gives the matched budget), got {steps!r}")
    if not lr > 0:
        raise ValueError(f"{where}: lr must be a positive learning rate, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"{where}: batch_size must be a positive int (examples per task per "
                         f"step), got {batch_size!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"{where}: momentum must be in [0, 1) (heavy-ball SGD), got {momentum!r}")
    for k, (head, task) in enumerate(zip(heads, tasks)):
        if len(task.train) == 0:
            raise ValueError(f"{where}: task {k} has an empty train split; every task needs "
                             f"training examples")
        out = getattr(head, "out_features", task.num_classes)
        if out != task.num_classes:
            raise ValueError(f"{where}: head {k} has {out} outputs but task {k} has "
                             f"{task.num_classes} classes; give each task the head fitted for it")


def train_multitask(
    backbone: nn.Module,
    heads: Sequence[nn.Module],
    tasks: Sequence[TaskSplits],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    momentum: float = 0.9,
    desc: str | None = None,
) -> MultitaskResult:
    """Train a copy of `backbone` (at theta0) jointly on the K tasks' train splits through
    their frozen `heads`; the arguments are left untouched. Deterministic given `seed`.

    Each of the `steps` SGD steps draws one minibatch of min(batch_size, n_k) examples from
    every task k and minimises the mean over tasks of the cross-entropy through task k's own
    head, L = 1/K sum_k CE(head_k(backbone(x_k)), y_k), one backbone forward per task (a
    task's batch is never mixed with another's, as a client sees it). Batches come by epochs
    of a seeded permutation per task, as `fit` draws them (`epoch_batches`): ONE
    torch.Generator seeded with `seed` draws the K first permutations in task order, then
    each new epoch's permutation of a task when that task runs out; with K=1 the batch order
    is exactly `fit`'s. The
    optimiser is torch.optim.SGD on the backbone's trainable parameters, heavy-ball
    `momentum` (0.9, as clients), no dampening, no Nesterov, no weight decay.

    Budget: `steps` and `lr` are given; the matched default is `default_multitask_steps`
    (the clients' mean local steps, each joint step seeing all K tasks: as many minibatches as
    the sum of the clients' minibatches) at the clients' lr and batch size.
    """
    _check(heads, tasks, steps, lr, batch_size, momentum)
    net = copy.deepcopy(backbone)
    device = next(net.parameters()).device
    frozen = [copy.deepcopy(h).to(device) for h in heads]
    for h in frozen:
        h.requires_grad_(False)
    data = [t.train.tensors for t in tasks]
    gen = torch.Generator().manual_seed(seed)
    # one generator, each task's epochs drawn when that task first needs one (task order)
    batches = [epoch_batches(len(y), min(batch_size, len(y)), gen) for _, y in data]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for h in frozen:
        h.train()
    per_step: list[list[float]] = []
    bar = tqdm(total=steps, desc=desc, disable=None if desc else True, leave=False)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        losses = []
        for (x, y), head, order in zip(data, frozen, batches):
            idx = next(order)
            losses.append(loss_fn(head(net(x[idx].to(device))), y[idx].to(device)))
        loss = torch.stack(losses).mean()
        loss.backward()
        opt.step()
        per_step.append([float(v.detach()) for v in losses])
        bar.update(1)
    bar.close()
    net.eval()
    window = max(1, min(10, steps // 5))
    mean_of = lambda rows: sum(sum(r) / len(r) for r in rows) / len(rows)  # noqa: E731
    state = {f"{MERGED_PREFIX}{k}": v.detach().clone() for k, v in net.state_dict().items()}
    task_last = [sum(r[k] for r in per_step[-window:]) / window for k in range(len(tasks))]
    return MultitaskResult(state, len(per_step), mean_of(per_step[:window]),
                           mean_of(per_step[-window:]), task_last)


def score_multitask(
    backbone: nn.Module,
    state: Mapping[str, torch.Tensor],
    heads: Sequence[nn.Module],
    tasks: Sequence[TaskSplits],
    splits: Sequence[str] = ("val", "test"),
    batch_size: int = 256,
) -> list[dict[str, float]]:
    """Per task, the accuracy and mean cross-entropy of backbone `state` (keys "backbone.*",
    e.g. `train_multitask`'s result, or theta0 for the base) through that task's own head,
    on each of `splits`: ``{"val-accuracy", "val-loss", "test-accuracy", "test-loss"}`` by
    default (fl_merge.models.evaluation.evaluate). `backbone` gives the architecture (a copy
    is loaded; it is left untouched)."""
    if len(heads) != len(tasks):
        raise ValueError(f"score_multitask: {len(heads)} heads for {len(tasks)} tasks; give one "
                         f"head per task, in task order")
    net = copy.deepcopy(backbone)
    body = {k[len(MERGED_PREFIX):]: v for k, v in state.items() if k.startswith(MERGED_PREFIX)}
    net.load_state_dict(body)
    device = next(net.parameters()).device
    rows = []
    for head, task in zip(heads, tasks):
        model = nn.Sequential(net, copy.deepcopy(head).to(device))
        row = {}
        for split in splits:
            acc, loss = evaluate(model, getattr(task, split), batch_size)
            row[f"{split}-accuracy"], row[f"{split}-loss"] = acc, loss
        rows.append(row)
    return rows
