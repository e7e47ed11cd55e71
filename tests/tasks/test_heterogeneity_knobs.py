"""Data and training heterogeneity knobs change what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.tasks.partitions import load_partitioned_task, partition_indices
from fl_merge_clients.training import mean_gradient, model_for_task
from fl_merge.config.run_config import ConfigError, RunConfig

LABELS = np.repeat(np.arange(10), 200)  # 2000 examples, balanced


def _hist(idx: np.ndarray) -> np.ndarray:
    return np.bincount(LABELS[idx], minlength=10)


def _parts(scheme: str, k: int = 5, **kw) -> list[np.ndarray]:
    return [partition_indices(LABELS, scheme, k, i, seed=0, **kw) for i in range(k)]


def _mean_tv_from_global(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of clients' label distributions from the global one."""
    return float(np.mean([0.5 * np.abs(_hist(p) / len(p) - 0.1).sum() for p in parts]))


def test_iid_partitions_are_disjoint_balanced_and_cover_the_pool():
    parts = _parts("iid")
    allidx = np.concatenate(parts)
    assert len(allidx) == len(LABELS) == len(np.unique(allidx))
    assert {len(p) for p in parts} == {400}
    assert _mean_tv_from_global(parts) < 0.1


def test_pathological_gives_each_client_exactly_its_classes():
    parts = _parts("pathological", classes_per_client=2)
    for p in parts:
        assert np.count_nonzero(_hist(p)) == 2
    assert _mean_tv_from_global(parts) == pytest.approx(0.8, abs=0.05)  # 2 of 10 classes


def test_dirichlet_alpha_controls_label_skew():
    skewed = _mean_tv_from_global(_parts("dirichlet", alpha=0.05))
    mild = _mean_tv_from_global(_parts("dirichlet", alpha=100.0))
    assert skewed > 0.5 > 0.15 > mild
    parts = _parts("dirichlet", alpha=0.05)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)) == len(LABELS)  # disjoint, complete


def test_partitioned_clients_share_one_head_and_the_global_test(theta0):
    a = load_partitioned_task("parity", "pathological", 2, 0, classes_per_client=1, pool=600)
    b = load_partitioned_task("parity", "pathological", 2, 1, classes_per_client=1, pool=600)
    assert set(a.train.tensors[1].tolist()) != set(b.train.tensors[1].tolist())
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    ha = model_for_task("mnist-cnn", a, theta0, seed=0).head.weight
    hb = model_for_task("mnist-cnn", b, theta0, seed=0).head.weight
    assert torch.equal(ha, hb)


def test_training_spreads_are_seeded_draws_in_range():
    cfg = RunConfig.from_flower({"num-clients": 6, "local-steps": "50..300", "lr": "0.001..0.1"}).resolve()
    assert all(50 <= s <= 300 for s in cfg.local_steps) and len(set(cfg.local_steps)) > 1
    assert all(0.001 <= lr <= 0.1 for lr in cfg.lrs) and len(set(cfg.lrs)) > 1
    again = RunConfig.from_flower({"num-clients": 6, "local-steps": "50..300", "lr": "0.001..0.1"}).resolve()
    assert again.local_steps == cfg.local_steps and again.lrs == cfg.lrs
    other = RunConfig.from_flower({"num-clients": 6, "local-steps": "50..300", "seed": 1}).resolve()
    assert other.local_steps != cfg.local_steps
    assert cfg.train_config()["local-steps"] == cfg.local_steps
    with pytest.raises(ConfigError, match="needs 0 < lo <= hi"):
        RunConfig.from_flower({"local-steps": "300..50"}).resolve()


@pytest.mark.parametrize("bad, message", [
    ({"data": "shards"}, "data must be tasks"),
    ({"data": "dirichlet", "alpha": 0}, "alpha must be positive"),
    ({"data": "iid", "partition-task": "nope"}, "unknown task(s) ['nope']"),
])
def test_bad_partition_config(bad, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower(bad).resolve()
    assert message in str(err.value)


def test_mean_gradient_is_the_full_batch_gradient(theta0):
    task = load_partitioned_task("parity", "iid", 2, 0, pool=600)
    model = model_for_task("mnist-cnn", task, theta0, seed=0)
    g = mean_gradient(model, task.train, n_samples=300, batch_size=64)  # uneven batches
    x, y = task.train.tensors
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x[:300]), y[:300]).backward()
    for k, p in model.named_parameters():
        if k.startswith("backbone."):
            torch.testing.assert_close(g[k], p.grad, rtol=1e-4, atol=1e-6)
    assert set(g) == {k for k in model.state_dict() if k.startswith("backbone.")}
