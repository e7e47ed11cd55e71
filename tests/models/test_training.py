"""Tasks and a client's local training on real data."""

from __future__ import annotations

import pytest
import torch

from fl_merge.tasks.registry import SUITES, TASKS, load_task
from fl_merge_clients.training import LocalTrainConfig, fine_tune, model_for_task
from fl_merge.models.evaluation import evaluate


def test_suite_tasks_are_registered_with_disjoint_deterministic_splits():
    assert len(SUITES["mnist8"]) == 8 and set(SUITES["mnist8"]) <= set(TASKS)
    for name in ("mnist-near", "mnist-mid", "mnist-far"):
        assert len(SUITES[name]) == 4 and set(SUITES[name]) <= set(TASKS)
    tilted, upright = load_task("rotate15").test.tensors[0], load_task("rotate-15").test.tensors[0]
    assert tilted.shape == upright.shape == (1000, 1, 28, 28) and not torch.equal(tilted, upright)
    a, b = load_task("parity", 0), load_task.__wrapped__("parity", 0)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])  # same seed, same data
    assert a.num_classes == 2 and set(a.train.tensors[1].unique().tolist()) == {0, 1}
    c = load_task.__wrapped__("parity", 1)
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    sub = load_task("rot180-5to9")
    assert sub.num_classes == 5 and int(sub.test.tensors[1].max()) == 4


def test_local_fine_tuning_lowers_loss_and_beats_chance_and_base(theta0):
    task = load_task("invert")
    model = model_for_task("mnist-cnn", task, theta0, seed=0)
    base_acc, base_loss = evaluate(model, task.test)
    head_before = model.head.weight.detach().clone()
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    metrics = fine_tune(model, task, LocalTrainConfig(steps=80, lr=0.01, batch_size=64, seed=0))
    assert metrics["train-loss"] < 0.5 * metrics["train-loss-first"]
    # FedNova's normaliser for 80 steps of SGD with momentum 0.9, simplified by hand:
    # [80 - 0.9 (1 - 0.9^80) / 0.1] / 0.1 = 710 + 90 * 0.9^80
    assert metrics["local-steps"] == 80
    assert metrics["fednova-a"] == pytest.approx(710 + 90 * 0.9**80, rel=1e-12)
    chance = 1 / task.num_classes
    assert metrics["finetuned-accuracy"] > chance + 0.5
    assert metrics["finetuned-accuracy"] > base_acc + 0.1
    # Only the backbone moved; the task head stayed frozen.
    assert torch.equal(model.head.weight, head_before)
    assert any(not torch.equal(v, backbone_before[k]) for k, v in model.backbone.state_dict().items())


def test_received_head_is_reused_instead_of_refitted(theta0):
    task = load_task("parity")
    model = model_for_task("mnist-cnn", task, theta0, seed=0)
    state = model.state_dict()
    state["head.bias"] = torch.tensor([5.0, -5.0])  # a head that always says class 0
    again = model_for_task("mnist-cnn", task, state, seed=0)
    assert torch.equal(again.head.bias, state["head.bias"])
    acc, _ = evaluate(again, task.test)
    share_class0 = float((task.test.tensors[1] == 0).float().mean())
    assert abs(acc - share_class0) < 0.05


def test_pretraining_is_deterministic_and_cached(tmp_path, monkeypatch):
    from fl_merge.models.registry import PretrainConfig, base_model_path, pretrained_backbone

    cfg = PretrainConfig(steps=5)
    states = []
    before = torch.get_num_threads()
    try:
        for i, threads in enumerate((2, 1)):  # the machine's thread count must not matter
            monkeypatch.setenv("FL_MERGE_CACHE", str(tmp_path / f"c{i}"))
            torch.set_num_threads(threads)
            states.append(pretrained_backbone("mnist-cnn", cfg, progress=False))
            path = base_model_path("mnist-cnn", cfg)
            assert path.is_absolute() and path.exists()
    finally:
        torch.set_num_threads(before)
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])
    # A corrupt cache file is rebuilt, not trusted.
    path.write_bytes(b"not a safetensors file")
    again = pretrained_backbone("mnist-cnn", cfg, progress=False)
    assert all(torch.equal(again[k], states[1][k]) for k in again)
    # A dead writer's leftover temp file is cleaned by the next write and never read.
    from fl_merge.core.files import _HOST

    stale = path.parent / f".{path.name}.tmp-{_HOST}-999999999-dead"
    stale.write_bytes(b"half a file")
    path.unlink()
    pretrained_backbone("mnist-cnn", cfg, progress=False)
    assert not stale.exists() and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_fit_reports_the_momentum_normaliser_and_checks_momentum_first():
    from torch import nn
    from torch.utils.data import TensorDataset

    from fl_merge.models.training import fit

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
    model = nn.Linear(3, 2)
    # 3 steps of momentum 0.5: the buffer weights sum to 1 + 1.5 + 1.75
    res = fit(model, data, steps=3, lr=0.1, batch_size=4, seed=0, momentum=0.5)
    assert res.steps == 3 and res.fednova_a == pytest.approx(4.25, rel=1e-12)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\), got 1.0"):
        fit(model, data, steps=3, lr=0.1, batch_size=4, seed=0, momentum=1.0)
    assert torch.equal(model.weight, before)  # refused before any training
