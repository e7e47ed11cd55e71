"""merged.safetensors in both layouts (fl_merge/io/merged_writer.py `write_merged_model`): one
file below the shard size, shards + index above it, and `load_merged` / `merged_metadata_of`
reading either into the same model, whose weights are theta0 + eta * Delta computed here."""

from __future__ import annotations

import json

import pytest
import torch

from fl_merge import load_merged
from fl_merge.io import results
from fl_merge.io.merged import merged_metadata_of
from fl_merge.io.merged_writer import write_merged_model
from fl_merge.models.registry import build_model

ETA = 0.6
META = {"method": "ties", "params": {"density": 0.2}, "eta": ETA, "tasks": "rotate90,parity",
        "model": "mnist-cnn"}


@pytest.fixture
def merge_inputs(theta0):
    g = torch.Generator().manual_seed(1)
    delta = {k: torch.randn(v.shape, generator=g) for k, v in theta0.items() if v.is_floating_point()}
    heads = {task: {k: v.detach() for k, v in build_model("mnist-cnn", n).state_dict().items()
                    if k.startswith("head.")} for task, n in (("rotate90", 10), ("parity", 2))}
    return theta0, delta, heads


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def test_one_file_and_shards_load_as_the_same_model_of_theta0_plus_eta_delta(tmp_path, merge_inputs):
    theta0, delta, heads = merge_inputs
    one = tmp_path / "one" / results.MODEL_FILE
    sharded = tmp_path / "sharded" / results.MODEL_FILE
    one.parent.mkdir()
    sharded.parent.mkdir()
    assert write_merged_model(one, theta0, delta, ETA, heads, META) == [one]
    files = write_merged_model(sharded, theta0, delta, ETA, heads, META, max_shard_bytes=20_000)
    index = sharded.with_name("merged.safetensors.index.json")
    shards = sorted(sharded.parent.glob("merged-*-of-*.safetensors"))
    assert files[-1] == index and len(shards) >= 3 and not sharded.exists()
    assert set(json.loads(index.read_text())["weight_map"].values()) == {p.name for p in shards}
    for path in (one, sharded, index):  # the index file names the model too
        assert merged_metadata_of(path) == META
    for task, head in heads.items():
        a, b = _state(load_merged(one, task)), _state(load_merged(sharded, task))
        assert set(a) == set(b)
        for k, v in a.items():
            assert torch.equal(v, b[k]), k
            if k.startswith("head."):
                assert torch.equal(v, head[k])
            elif k in delta:  # float32 arithmetic, written out
                torch.testing.assert_close(v, theta0[k] + ETA * delta[k], rtol=0, atol=1e-6)
            else:
                assert torch.equal(v, theta0[k])


def test_one_file_is_byte_for_byte_what_save_merged_model_writes(tmp_path, merge_inputs):
    theta0, delta, heads = merge_inputs
    merged = {k: (v + ETA * delta[k]) if k in delta else v for k, v in theta0.items()}
    results.save_merged_model(tmp_path / "a.safetensors", merged, heads, META)
    write_merged_model(tmp_path / "b.safetensors", theta0, delta, ETA, heads, META)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_a_new_layout_replaces_the_earlier_one_whole(tmp_path, merge_inputs):
    theta0, delta, heads = merge_inputs
    path = tmp_path / results.MODEL_FILE
    (tmp_path / "results.csv").write_text("kept\n")
    write_merged_model(path, theta0, delta, ETA, heads, META, max_shard_bytes=20_000)
    write_merged_model(path, theta0, delta, ETA, heads, META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors", "results.csv"]
    write_merged_model(path, theta0, delta, ETA, heads, META, max_shard_bytes=20_000)
    assert not path.exists() and (tmp_path / "merged.safetensors.index.json").is_file()
    assert "results.csv" in {p.name for p in tmp_path.iterdir()}


def test_a_missing_shard_or_model_is_one_line(tmp_path, merge_inputs):
    theta0, delta, heads = merge_inputs
    path = tmp_path / results.MODEL_FILE
    with pytest.raises(ValueError, match=r"^no merged model at .*merged.safetensors: neither that file "
                                         r"nor its shard index merged.safetensors.index.json exists$"):
        load_merged(path, "parity")
    write_merged_model(path, theta0, delta, ETA, heads, META, max_shard_bytes=20_000)
    gone = sorted(tmp_path.glob("merged-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(ValueError, match=rf"shard file\(s\) \['.*/{gone.name}'\] named in .* are missing$"):
        merged_metadata_of(path)


def test_bad_metadata_or_names_are_refused_before_anything_is_written(tmp_path, merge_inputs):
    theta0, delta, heads = merge_inputs
    path = tmp_path / results.MODEL_FILE
    with pytest.raises(ValueError, match=r"may hold only .*\['run_id'\]"):
        write_merged_model(path, theta0, delta, ETA, heads, {**META, "run_id": 3})
    with pytest.raises(ValueError, match=r"update has parameters the base model lacks: \['backbone.x'\]"):
        write_merged_model(path, theta0, {"backbone.x": torch.ones(1)}, ETA, heads, META)
    assert list(tmp_path.iterdir()) == []
