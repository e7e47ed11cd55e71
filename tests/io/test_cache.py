"""The client-update cache: a cached client does not train; bad entries are rebuilt."""

from __future__ import annotations

import pytest
import torch

import fl_merge_clients.client_app as client_app
from fl_merge.io.update_cache import entry_path, load_update, state_digest, update_key


@pytest.fixture
def config():
    return {"model": "mnist-cnn", "tasks": ["parity", "invert"], "data-seed": 0, "data": "tasks",
            "local-steps": 5, "lr": 0.01, "batch-size": 32, "seed": [0, 1], "cache": True}


def _cache_files(tmp_path):
    return sorted((tmp_path / "updates").glob("*.safetensors"))


def test_second_identical_request_is_served_from_cache(theta0, config, counted_trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("FL_MERGE_CACHE", str(tmp_path))
    state1, m1 = client_app.local_train(config, 0, theta0)
    state2, m2 = client_app.local_train(config, 0, theta0)
    assert len(counted_trainer) == 1  # the trainer ran once
    assert (m1["cached"], m2["cached"]) == (0, 1)
    assert all(torch.equal(state1[k], state2[k]) for k in state1)
    assert m2["finetuned-accuracy"] == m1["finetuned-accuracy"]
    # Anything that determines the update changes the key: another seed trains again.
    client_app.local_train({**config, "seed": [7, 1]}, 0, theta0)
    theta_other = {k: v + 1e-3 for k, v in theta0.items()}
    client_app.local_train(config, 0, theta_other)
    assert len(counted_trainer) == 3 and len(_cache_files(tmp_path)) == 3
    # cache=False always trains.
    client_app.local_train({**config, "cache": False}, 0, theta0)
    assert len(counted_trainer) == 4


def test_corrupt_or_tampered_entry_is_rebuilt(theta0, config, counted_trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("FL_MERGE_CACHE", str(tmp_path))
    state1, _ = client_app.local_train(config, 1, theta0)
    (entry,) = _cache_files(tmp_path)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a partial write
    state2, m2 = client_app.local_train(config, 1, theta0)
    assert len(counted_trainer) == 2 and m2["cached"] == 0
    assert all(torch.equal(state1[k], state2[k]) for k in state1)  # same seed, same update
    # Bytes changed but still a loadable file: the checksum catches it.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(entry), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(entry))
    tensors["head.bias"] = tensors["head.bias"] + 1.0
    save_file(tensors, str(entry), metadata=meta)  # content no longer matches its checksum
    assert load_update(entry.stem, tmp_path) is None and not entry.exists()


def test_key_and_digest_are_stable():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    assert state_digest(a) == state_digest(dict(reversed(list(a.items()))))
    assert state_digest(a) != state_digest({**a, "b": torch.ones(2)})
    assert update_key("x", {"lr": 0.1}) == update_key("x", {"lr": 0.1}) != update_key("x", {"lr": 0.2})
    assert entry_path("k").is_absolute()


def test_cached_clients_says_before_a_run_which_clients_would_not_train(theta0, config, tmp_path, monkeypatch):
    monkeypatch.setenv("FL_MERGE_CACHE", str(tmp_path))
    assert client_app.cached_clients(config, theta0) == [False, False]
    client_app.local_train(config, 0, theta0)  # client 0 trains once and is cached
    assert client_app.cached_clients(config, theta0) == [True, False]
    # asking for an extra (e.g. Fisher, when a fisher method joins the run) is another update
    assert client_app.cached_clients({**config, "compute-fisher": True}, theta0) == [False, False]
    _, metrics = client_app.local_train(config, 0, theta0)
    assert metrics["cached"] == 1
