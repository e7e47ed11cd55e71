"""Multi-task training on the union of the tasks' data (fl_merge/models/multitask.py), on
tiny synthetic Gaussian-blob tasks and a small MLP backbone built here."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_merge.models.multitask import default_multitask_steps, score_multitask, train_multitask

D = 6  # input dimensions: 0..2 carry the classes, 3..5 are noise


@dataclass
class Blobs:
    num_classes: int
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def blobs(mean: list[float], seed: int, n_train: int = 300) -> Blobs:
    """Two classes at +mean and -mean (unit-variance Gaussian noise in every dimension)."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.tensor(mean + [0.0] * (D - len(mean)))

    def split(n: int) -> TensorDataset:
        y = torch.randint(0, 2, (n,), generator=gen)
        x = torch.randn(n, D, generator=gen) + (1 - 2 * y.float())[:, None] * mu
        return TensorDataset(x, y)

    return Blobs(2, split(n_train), split(200), split(500))


# The two tasks' best backbones conflict only in part: both read dimension 2, with opposite signs.
TASK_A = [2.0, 0.0, 1.0]
TASK_B = [0.0, 2.0, -1.0]


def backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 2))


def head(direction: tuple[float, float]) -> nn.Linear:
    """A frozen 2-class head reading the feature direction `direction` (class 0 on its + side)."""
    h = nn.Linear(2, 2)
    with torch.no_grad():
        h.weight.copy_(torch.tensor([direction, [-v for v in direction]]))
        h.bias.zero_()
    return h


def accuracy(net: nn.Module, h: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((h(net(x)).argmax(1) == y).float().mean())


def loaded(state: dict[str, torch.Tensor], seed: int = 0) -> nn.Module:
    net = backbone(seed)
    net.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()})
    return net


def test_one_task_equals_a_hand_written_sgd_momentum_loop():
    task = blobs(TASK_A, seed=1, n_train=100)  # 100 = 6 batches of 16 + 4 left: epochs wrap
    net, h = backbone(), head((1.0, 0.0))
    net_before = copy.deepcopy(net.state_dict())
    steps, lr, bs, seed = 25, 0.05, 16, 7
    got = train_multitask(net, [h], [task], steps=steps, lr=lr, batch_size=bs, seed=seed)

    # the reference: plain autograd and a hand-written heavy-ball update
    ref = backbone()
    params = list(ref.parameters())
    bufs = [None] * len(params)
    x, y = task.train.tensors
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(100, generator=gen), 0
    for _ in range(steps):
        if pos + bs > 100:
            perm, pos = torch.randperm(100, generator=gen), 0
        idx = perm[pos : pos + bs]
        pos += bs
        loss = nn.functional.cross_entropy(h(ref(x[idx])), y[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                bufs[i] = g.clone() if bufs[i] is None else 0.9 * bufs[i] + g
                p -= lr * bufs[i]

    expected = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    assert got.state.keys() == expected.keys() == {"backbone.0.weight", "backbone.0.bias",
                                                   "backbone.2.weight", "backbone.2.bias"}
    for k in expected:
        torch.testing.assert_close(got.state[k], expected[k], rtol=0, atol=1e-6)
        assert not torch.equal(got.state[k], net_before[k.removeprefix("backbone.")])  # it moved
    assert got.steps == steps
    # the arguments are untouched: the backbone at theta0, the head as given
    assert all(torch.equal(v, net_before[k]) for k, v in net.state_dict().items())
    assert torch.equal(h.weight, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


def test_joint_training_lifts_both_partly_conflicting_tasks_above_the_base():
    tasks = [blobs(TASK_A, seed=1), blobs(TASK_B, seed=2)]
    heads = [head((1.0, 0.0)), head((0.0, 1.0))]
    net = backbone()
    base = [accuracy(net, h, t.test) for h, t in zip(heads, tasks)]
    res = train_multitask(net, heads, tasks, steps=150, lr=0.05, batch_size=32, seed=0)
    joint = [accuracy(loaded(res.state), h, t.test) for h, t in zip(heads, tasks)]
    # both well above the base and near the blobs' Bayes accuracy (Phi(|mean|) ~ 0.987)
    for b, j in zip(base, joint):
        assert j > 0.9 and j > b + 0.15, (base, joint)
    assert res.last_loss < 0.5 * res.first_loss
    # trained on task A alone, the backbone does not serve task B as the joint one does
    alone = train_multitask(net, heads[:1], tasks[:1], steps=150, lr=0.05, batch_size=32, seed=0)
    assert accuracy(loaded(alone.state), heads[1], tasks[1].test) < joint[1] - 0.15


def test_scores_are_each_tasks_accuracy_and_loss_through_its_own_head():
    tasks = [blobs(TASK_A, seed=1), blobs(TASK_B, seed=2)]
    heads = [head((1.0, 0.0)), head((0.0, 1.0))]
    net = backbone()
    res = train_multitask(net, heads, tasks, steps=40, lr=0.05, batch_size=32, seed=0)
    rows = score_multitask(net, res.state, heads, tasks)
    trained = loaded(res.state)
    for row, h, t in zip(rows, heads, tasks):
        assert set(row) == {"val-accuracy", "val-loss", "test-accuracy", "test-loss"}
        for split in ("val", "test"):
            x, y = getattr(t, split).tensors
            with torch.no_grad():
                logits = h(trained(x))
            acc = float((logits.argmax(1) == y).float().mean())
            assert row[f"{split}-accuracy"] == pytest.approx(acc)
            loss = float(nn.functional.cross_entropy(logits, y))
            assert row[f"{split}-loss"] == pytest.approx(loss, rel=1e-5)
    # theta0's own state scores the base
    theta0 = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    base = score_multitask(net, theta0, heads, tasks, splits=("test",))
    hand = [accuracy(net, h, t.test) for h, t in zip(heads, tasks)]
    assert [r["test-accuracy"] for r in base] == pytest.approx(hand)


def test_deterministic_given_the_seed_and_different_for_another():
    tasks = [blobs(TASK_A, seed=1), blobs(TASK_B, seed=2)]
    heads = [head((1.0, 0.0)), head((0.0, 1.0))]
    run = lambda seed: train_multitask(backbone(), heads, tasks, steps=20, lr=0.05,  # noqa: E731
                                       batch_size=32, seed=seed)
    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert (a.first_loss, a.last_loss, a.task_last_loss) == (b.first_loss, b.last_loss, b.task_last_loss)
    assert any(not torch.equal(a.state[k], c.state[k]) for k in a.state)


def test_default_budget_is_the_clients_mean_steps_so_as_many_minibatches_as_all_clients():
    local = [50, 126, 317, 800]  # experiments/step_spread.py's r=16 counts
    steps = default_multitask_steps(local)
    assert steps == 323  # 1293 / 4 = 323.25
    assert abs(steps * len(local) - 1293) < len(local)  # K joint minibatches per step
    assert default_multitask_steps([150] * 4) == 150
    with pytest.raises(ValueError, match="positive local steps"):
        default_multitask_steps([])


def _no_tasks(kw):
    kw["heads"], kw["tasks"] = [], []


def _one_head(kw):
    kw["heads"] = kw["heads"][:1]


def _three_class_head(kw):
    kw["heads"][1] = nn.Linear(2, 3)


@pytest.mark.parametrize("change, words", [
    (_no_tasks, ["K=0", "at least one task"]),
    (_one_head, ["1 heads for 2 tasks", "one frozen head per task"]),
    ({"steps": 0}, ["steps must be a positive int", "got 0"]),
    ({"steps": -3}, ["steps must be a positive int", "got -3"]),
    ({"steps": 2.5}, ["steps must be a positive int", "got 2.5"]),
    ({"lr": 0.0}, ["lr must be a positive", "got 0.0"]),
    ({"lr": -0.1}, ["lr must be a positive", "got -0.1"]),
    ({"batch_size": 0}, ["batch_size must be a positive int", "got 0"]),
    (_three_class_head, ["head 1 has 3 outputs but task 1 has 2 classes"]),
])
def test_bad_input_is_one_clear_line(change, words):
    kw = {"heads": [head((1.0, 0.0)), head((0.0, 1.0))],
          "tasks": [blobs(TASK_A, seed=1, n_train=20), blobs(TASK_B, seed=2, n_train=20)],
          "steps": 5, "lr": 0.05, "batch_size": 8, "seed": 0}
    change(kw) if callable(change) else kw.update(change)
    with pytest.raises(ValueError) as err:
        train_multitask(backbone(), kw.pop("heads"), kw.pop("tasks"), **kw)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("train_multitask: ")
    for w in words:
        assert w in msg, msg
