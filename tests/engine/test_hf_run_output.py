"""A real round on an hf: model (a tiny ViT the test saves) writes merged-hf/ beside
merged.safetensors: a Hugging Face folder transformers loads with no missing or unexpected
keys, holding the merged backbone the round scored, under the source folder's own names;
both sharded with an index when above run-config max-shard-size."""

from __future__ import annotations

import json

import pytest
import torch

from fl_merge import load_merged
from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.io import results
from simulate import simulate_round

transformers = pytest.importorskip("transformers")

VIT = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=2,
           num_attention_heads=2, intermediate_size=48)
TASKS = ("rotate90", "invert")


def test_an_hf_run_writes_a_sharded_folder_transformers_loads(tmp_path):
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**VIT)).save_pretrained(tmp_path / "vit")
    out = tmp_path / "run"
    cfg = RunConfig.from_flower({
        "num-clients": 2, "tasks": ",".join(TASKS), "model": f"hf:{tmp_path / 'vit'}",
        "local-steps": "10", "search": "off", "etas": "1", "method": "task_arithmetic,median",
        "measure-heterogeneity": False, "max-shard-size": "40KB", "output-dir": str(out),
    }).resolve()
    r = simulate_round(cfg, 2)
    for label, file in (("task_arithmetic", results.MODEL_FILE), ("median", "merged-median.safetensors")):
        folder = out / file.replace(".safetensors", "-hf")
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2  # sharded at 40 KB
        assert (folder / "config.json").read_text() == (tmp_path / "vit" / "config.json").read_text()
        model, info = transformers.AutoModel.from_pretrained(str(folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        hf_state = model.state_dict()
        merged = r.merged_state(r.best_etas[label], label)  # what the round scored
        assert {f"backbone.net.{k}" for k in hf_state} == set(merged)
        for k, v in hf_state.items():
            assert torch.equal(v, merged[f"backbone.net.{k}"]), k
        # merged.safetensors, sharded too, holds the same backbone and each task's head
        assert (out / (file + ".index.json")).is_file() and not (out / file).exists()
        for task in TASKS:
            ours = load_merged(out / file, task).state_dict()
            assert all(torch.equal(ours[f"backbone.net.{k}"], v) for k, v in hf_state.items())


def test_max_shard_size_must_be_a_size():
    with pytest.raises(ConfigError, match=r"^max-shard-size must be a size like 5GB, 500MB or 2GiB, "
                                          r"got '5 parsecs'$"):
        RunConfig(max_shard_size="5 parsecs").resolve()
