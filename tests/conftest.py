"""Shared fixtures. Every test session gets its own model cache (FL_MERGE_CACHE), so tests
never read or write a user's cache and always exercise pretraining once."""

from __future__ import annotations

import os
import tempfile

import pytest

_CACHE = tempfile.mkdtemp(prefix="fl-merge-test-cache-")
os.environ["FL_MERGE_CACHE"] = _CACHE  # set before any test (and any Ray worker) starts


@pytest.fixture(scope="session")
def theta0():
    """The default pretrained base backbone (pretrained once per session)."""
    from fl_merge.config.run_config import RunConfig
    from fl_merge.models.registry import PretrainConfig, pretrained_backbone

    cfg = RunConfig()
    return pretrained_backbone(cfg.model, PretrainConfig(steps=cfg.pretrain_steps,
                                                         seed=cfg.pretrain_seed), progress=False)


@pytest.fixture
def message_identity(monkeypatch):
    """A Message built outside Flower reads the run and task id of its process (set by Flower
    inside a real ServerApp or ClientApp): tests that call a handler directly set them."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


@pytest.fixture
def counted_trainer(monkeypatch):
    """The calls of the client's trainer (fl_merge_clients.client_app.fine_tune), counted: one
    entry per training, so a test sees whether an update came from the cache instead."""
    from fl_merge_clients import client_app

    calls = []
    real = client_app.fine_tune

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_app, "fine_tune", spy)
    return calls


@pytest.fixture(scope="session")
def fisher_runs(tmp_path_factory):
    """One small round through Flower's simulation engine, run twice; test_end_to_end and
    test_merged_model both read it (each Flower start-up costs ~10 s). K=2 Fisher merging with
    heterogeneous local steps (clients compute and send their diagonal Fisher), first in memory,
    then the same config with spill=true (replies and task vectors on disk), whose clients reuse
    the first run's updates from the client cache. Returns [(round, output dir)] * 2."""
    from fl_merge.config.run_config import RunConfig
    from simulate import simulate_round

    runs = []
    for spill in (False, True):
        out = tmp_path_factory.mktemp("fisher-spilled" if spill else "fisher")
        cfg = RunConfig.from_flower({
            "num-clients": 2, "tasks": "rotate90,parity", "local-steps": "40,60", "spill": spill,
            "etas": "0.5,1,2", "output-dir": str(out), "method": "fisher", "fisher-samples": 64,
        }).resolve()
        runs.append((simulate_round(cfg, 2), out))
    return runs
