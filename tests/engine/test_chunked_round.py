"""Chunked messages (run-config chunk-mib, docs/protocol.md "Chunked messages") through
Flower's simulation engine: the in-memory round of conftest.fisher_runs again, with a chunk
limit that cuts every client's update into several groups. The clients find their updates in
the client cache, whose key hashes the bytes of the theta0 they assembled from groups: a hit
proves the assembled theta0 is bit for bit the whole message's (training again on it proved
nothing more and cost its training). The merged model and every score equal the
whole-message round's; no message carried more than the limit; the clients' node-local files
are gone after the run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_merge.io import results
from fl_merge.round.chunks import chunk_groups, chunk_limit, tensor_bytes

CHUNK_MIB = 0.77  # the test model's largest tensor is 0.766 MiB (backbone.7.weight)
CHUNK_FOLDER = Path(tempfile.gettempdir()) / "fl-merge-chunks"  # clients/chunked.py, no cache-dir


def _entries() -> set[str]:
    return {p.name for p in CHUNK_FOLDER.iterdir()} if CHUNK_FOLDER.exists() else set()


@pytest.fixture(scope="module")
def chunked(fisher_runs, tmp_path_factory):
    """(whole-message round, its output dir, chunked round, its output dir, chunk folder
    entries before the chunked run)."""
    from fl_merge.config.run_config import RunConfig
    from simulate import simulate_round

    out = tmp_path_factory.mktemp("fisher-chunked")
    cfg = RunConfig.from_flower({
        "num-clients": 2, "tasks": "rotate90,parity", "local-steps": "40,60",
        "etas": "0.5,1,2", "output-dir": str(out), "method": "fisher", "fisher-samples": 64,
        "chunk-mib": CHUNK_MIB,
    }).resolve()
    before = _entries()
    (whole, whole_out), _ = fisher_runs
    return whole, whole_out, simulate_round(cfg, 2), out, before


def test_a_chunked_round_merges_and_scores_exactly_as_whole_messages(chunked):
    whole, whole_out, r, out, _ = chunked
    assert not r.failures and len(r.clients) == 2
    # cached: the key hashed the assembled theta0's bytes and found the whole round's update
    assert all(c.chunked and c.grid_eval and c.metrics["cached"] == 1 for c in r.clients)
    want, got = load_file(str(whole_out / results.MODEL_FILE)), load_file(str(out / results.MODEL_FILE))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    key = ("method", "model", "eta", "task", "split", "selected")
    scores = {tuple(row[k] for k in key): (row["accuracy"], row["loss"]) for row in whole.rows}
    assert {tuple(row[k] for k in key): (row["accuracy"], row["loss"]) for row in r.rows} == scores
    assert r.best_etas == whole.best_etas and r.metrics == whole.metrics
    assert json.loads((out / results.RUN_FILE).read_text())["chunking"] == r.chunking


def test_no_message_carries_more_than_the_limit_and_each_kind_is_counted(chunked, theta0):
    whole, _, r, _, _ = chunked  # sizes from the whole-message round (its arrays are in memory)
    limit, k = chunk_limit(CHUNK_MIB), len(r.clients)
    theta0_groups = len(chunk_groups(theta0, limit))
    update_groups = [int(c.metrics["chunk-groups"]) for c in r.clients]
    delta_groups = len(chunk_groups(whole.delta, limit))
    assert min(update_groups) >= 3  # weights + head, the Fisher and the gradient at theta0
    rec = r.chunking
    assert rec["chunk-bytes"] == limit and 0 < rec["largest-message-tensor-bytes"] <= limit
    # update replies: half the chunk (0.385 MiB) raised to theta0's largest tensor, backbone.7.weight
    # [128, 1568] float32 = 802816 bytes; every reply within it
    assert rec["reply-bytes"] == 128 * 1568 * 4
    assert 0 < rec["largest-tensor-bytes"]["update"] <= 128 * 1568 * 4
    # validation (one fisher setting: one Delta) and test (the chosen one): two score phases
    assert rec["messages"] == {"theta0": k * theta0_groups, "train": k, "get": sum(update_groups),
                               "update": sum(update_groups), "delta": 2 * k * delta_groups, "own": 2 * k,
                               "score": 2 * k, "drop": k}
    assert rec["tensor-bytes"]["theta0"] == k * sum(tensor_bytes(v) for v in theta0.values())
    assert rec["tensor-bytes"]["update"] == sum(
        sum(tensor_bytes(v) for v in c.state.values())
        + sum(tensor_bytes(v) for e in c.extras.values() for v in e.values()) for c in whole.clients)
    assert rec["tensor-bytes"]["train"] == rec["tensor-bytes"]["score"] == 0  # config only


def test_the_clients_leave_no_files_behind(chunked):
    *_, before = chunked
    assert _entries() <= before
