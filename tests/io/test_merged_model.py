"""merged.safetensors: the same bytes for the same config and seeds, and `fl_merge.load_merged`
gives back a ready model per task that scores what results.csv says."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fl_merge import load_merged
from fl_merge.io import results

TASKS = ("rotate90", "parity")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_runs(fisher_runs):
    """The same config run twice (conftest.fisher_runs: a K=2 Fisher merge; the second run
    spills to disk and reuses the client-update cache): their output folders."""
    return [out for _, out in fisher_runs]


def test_identical_runs_write_identical_merged_models(two_runs):
    a, b = (out / results.MODEL_FILE for out in two_runs)
    assert _sha256(a) == _sha256(b)
    # The runs themselves differ: their ids live in run.json, not in the model file.
    ids = [json.loads((out / results.RUN_FILE).read_text())["run_id"] for out in two_runs]
    assert ids[0] != ids[1]
    with safe_open(str(a), framework="pt") as f:
        meta = json.loads(f.metadata()[results.MERGED_METADATA_KEY])
    assert meta["model"] == "mnist-cnn" and meta["method"] == "fisher"
    assert meta["tasks"] == ",".join(TASKS) and "run_id" not in meta


def _accuracy(model: torch.nn.Module, task: str) -> float:
    """Top-1 accuracy on the task's test split, in one plain loop (not fl_merge.models.evaluation)."""
    from fl_merge.tasks.registry import load_task

    x, y = load_task(task, 0).test.tensors
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 500):
            correct += int((model(x[i:i + 500]).argmax(dim=1) == y[i:i + 500]).sum())
    return correct / len(y)


def test_load_merged_scores_what_results_csv_records(two_runs):
    out = two_runs[0]
    rows = [r for r in results.read_rows(out / results.RESULTS_FILE)
            if r["model"] == "merged" and r["selected"] is True and r["split"] == "test"]
    assert sorted(r["task"] for r in rows) == sorted(TASKS)
    for r in rows:
        model = load_merged(out / results.MODEL_FILE, r["task"])
        assert isinstance(model, torch.nn.Module) and not model.training
        assert model.head.out_features == (2 if r["task"] == "parity" else 10)
        acc = _accuracy(model, r["task"])
        assert acc == pytest.approx(r["accuracy"], abs=1e-6)
        assert acc > 0.6  # far above chance (0.1 and 0.5)


def test_load_merged_names_the_tasks_in_the_file_for_an_unknown_task(two_runs):
    with pytest.raises(ValueError, match=r"task 'blur' is not in .*merged.safetensors; "
                                         r"it holds heads for: parity, rotate90$"):
        load_merged(two_runs[0] / results.MODEL_FILE, "blur")


# --------------------------------------------------------------------------- no run needed

def _write(path: Path, metadata: dict) -> bytes:
    backbone = {"backbone.0.weight": torch.arange(6.0).view(2, 3), "backbone.0.bias": torch.ones(2)}
    heads = {"t": {"head.weight": torch.zeros(3, 2)}}
    results.save_merged_model(path, backbone, heads, metadata)
    return path.read_bytes()


def test_metadata_order_does_not_change_the_bytes(tmp_path):
    fields = {"method": "ties", "params": {"k": 0.2, "density": 0.3}, "eta": 1.5, "tasks": "a,b",
              "model": "mnist-cnn"}
    backwards = {k: (dict(reversed(v.items())) if isinstance(v, dict) else v)
                 for k, v in reversed(fields.items())}
    blobs = {_write(tmp_path / f"m{i}.safetensors", f) for i, f in enumerate([fields, backwards] * 3)}
    assert len(blobs) == 1


def test_tensor_order_does_not_change_the_bytes_and_safetensors_reads_them_back(tmp_path):
    backbone = {"backbone.b": torch.ones(2, dtype=torch.float16), "backbone.a": torch.arange(6.0).view(2, 3)}
    heads = {"t": {"head.weight": torch.zeros(3, 2), "head.bias": torch.ones(3)}}
    turned = {k: backbone[k] for k in reversed(backbone)}
    turned_heads = {"t": {k: heads["t"][k] for k in reversed(heads["t"])}}
    blobs = set()
    for i, (b, h) in enumerate([(backbone, heads), (turned, turned_heads)]):
        path = tmp_path / f"m{i}.safetensors"
        results.save_merged_model(path, b, h, {"eta": 1.0})
        blobs.add(path.read_bytes())
        with safe_open(str(path), framework="pt") as f:  # the safetensors library reads it
            got = {k: f.get_tensor(k) for k in f.keys()}
            assert json.loads(f.metadata()[results.MERGED_METADATA_KEY]) == {"eta": 1.0}
        want = {**backbone, "heads.t.weight": heads["t"]["head.weight"], "heads.t.bias": heads["t"]["head.bias"]}
        assert set(got) == set(want)
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in want.items())
    assert len(blobs) == 1


@pytest.mark.parametrize("metadata, message", [
    ({"method": "fedavg", "run_id": 7},
     r"may hold only eta, method, model, params, tasks .*\['run_id'\].*run.json"),
    ({"eta": 1.0, "time": "12:00", "host": "x"}, r"got \['host', 'time'\]"),
    ({"params": {"when": datetime.datetime(2026, 1, 1)}}, r"plain JSON values"),
    ({"eta": float("nan")}, r"plain JSON values"),
])
def test_save_merged_model_refuses_volatile_or_inexact_metadata(tmp_path, metadata, message):
    with pytest.raises(ValueError, match=message):
        _write(tmp_path / "m.safetensors", metadata)
    assert not (tmp_path / "m.safetensors").exists()  # nothing half-written
