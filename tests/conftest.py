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
