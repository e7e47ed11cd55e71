"""merged-hf/: a run's merged hf: backbone as a Hugging Face folder (fl_merge/io/merged_writer.py
`write_hf_model`). transformers itself loads it (AutoModel / AutoModelForCausalLM, no missing
or unexpected keys) and its weights are the source folder's file + eta * Delta, computed
here from the source's own safetensors file; sharded above the shard size; written one
tensor at a time from memory-mapped theta0 and Delta; never half-written."""

from __future__ import annotations

import json
import shutil
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_merge.core.safetensors_writer import save_tensors
from fl_merge.io.merged_writer import hf_folder_name, hf_model_folder, write_hf_model
from fl_merge.io.spill import MappedState
from fl_merge.models.registry import pretrained_backbone

transformers = pytest.importorskip("transformers")

ETA = 0.7
META = {"method": "task_arithmetic", "eta": ETA, "tasks": "a,b"}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _minilm() -> Path:
    from fl_merge.models.hub import minilm_path

    return Path(minilm_path())


def _random_delta(theta0: Mapping[str, torch.Tensor], pick: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Delta on the float parameters whose name contains `pick` (float32, as task vectors)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in theta0.items()
            if pick in k and v.is_floating_point()}


def _expected(source_file: Path, delta: Mapping[str, torch.Tensor], prefix: str, strip: str = ""):
    """The source's own tensors, plus ETA * Delta where the run merged them: the run's name is
    `prefix` + the source name without `strip`."""
    out = {}
    for k, v in load_file(str(source_file)).items():
        d = delta.get(prefix + k.removeprefix(strip)) if k.startswith(strip) else None
        out[k] = v if d is None else (v.double() + ETA * d.double()).to(v.dtype)
    return out


def _loads_cleanly(loader, folder: Path) -> dict[str, torch.Tensor]:
    model, info = loader.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.state_dict()


def _assert_weights(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                    strip: str = "") -> None:
    # MiniLM's file still holds BERT's position_ids, a buffer transformers now builds itself
    assert {k.removeprefix(strip) for k in expected} - set(state) <= {"embeddings.position_ids"}
    for k, want in expected.items():
        if k.removeprefix(strip) not in state:
            continue
        got = state[k.removeprefix(strip)]
        assert got.dtype == want.dtype, k
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=k)


def test_the_minilm_run_model_is_a_folder_transformers_loads(tmp_path):
    src = _minilm()
    theta0 = pretrained_backbone(f"hf:{src}")  # the run's names: backbone.encoder.*
    delta = _random_delta(theta0, ".layer.0.")  # merge-keys on the first layer only
    out = tmp_path / hf_folder_name("merged.safetensors")
    files = write_hf_model(out, src, theta0, delta, ETA, META)
    assert out.name == "merged-hf" and all(f.parent == out for f in files)
    # the source's config, tokenizer and sentence-transformers files, never its card or weights
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "config_sentence_transformers.json", "data_config.json", "model.safetensors",
        "modules.json", "sentence_bert_config.json", *TOKENIZER_FILES])
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    state = _loads_cleanly(transformers.AutoModel, out)
    expected = _expected(src / "model.safetensors", delta, "backbone.encoder.")
    assert sum(1 for k in expected if ".layer.0." in k) == len(delta) > 0
    _assert_weights(state, expected)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("hello world")["input_ids"] == transformers.AutoTokenizer.from_pretrained(str(src))(
        "hello world")["input_ids"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged-hf"]  # no temporary sibling left


def _tiny_llama(folder: Path) -> None:
    """A causal LM built from a config (untied lm_head) with MiniLM's tokenizer beside it."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=30522, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(_minilm() / name, folder / name)


class Tracked(Mapping[str, torch.Tensor]):
    """A mapping over `inner` that records, at each lookup, how many of the tensors it handed
    out are still alive (weak references) and how many bytes are on disk under `watch`: a
    writer that built the merged state first would read every input before writing a byte."""

    def __init__(self, inner: Mapping[str, torch.Tensor], watch: Path, seen: dict[str, list]):
        self.inner, self.watch, self.seen = inner, watch, seen

    def __getitem__(self, key: str) -> torch.Tensor:
        self.seen["alive"].append(sum(1 for r in self.seen["refs"] if r() is not None))
        self.seen["on_disk"].append(sum(p.stat().st_size for p in self.watch.rglob("*") if p.is_file()))
        t = self.inner[key].clone()  # a fresh tensor each time, as a memory map is
        self.seen["refs"].append(weakref.ref(t))
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def test_a_causal_lm_is_sharded_with_an_index_from_memory_mapped_inputs(tmp_path):
    src = tmp_path / "llama"
    _tiny_llama(src)
    theta0 = pretrained_backbone(f"hf:{src}")  # LlamaModel under backbone.encoder.*, no lm_head
    assert not any("lm_head" in k for k in theta0)
    delta = _random_delta(theta0, "")
    # theta0 and Delta memory-mapped, as a spilling round holds them
    save_tensors(tmp_path / "theta0.safetensors", theta0)
    save_tensors(tmp_path / "delta.safetensors", delta)
    out = tmp_path / "run" / "merged-hf"
    out.parent.mkdir()
    seen: dict[str, list] = {"alive": [], "on_disk": [], "refs": []}
    mapped0 = Tracked(MappedState(tmp_path / "theta0.safetensors"), out.parent, seen)
    mapped_delta = Tracked(MappedState(tmp_path / "delta.safetensors"), out.parent, seen)
    write_hf_model(out, src, mapped0, mapped_delta, ETA, META, max_shard_bytes=400_000)
    assert max(seen["alive"]) <= 2, f"the writer held {max(seen['alive'])} input tensors at once"
    weights = sum(p.stat().st_size for p in out.glob("model-*.safetensors"))
    # inputs are read while the output is written: the last ones after most of it is on disk
    assert max(seen["on_disk"]) > weights // 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    assert {"config.json", "generation_config.json", *TOKENIZER_FILES} <= {p.name for p in out.iterdir()}
    state = _loads_cleanly(transformers.AutoModelForCausalLM, out)
    expected = _expected(src / "model.safetensors", delta, "backbone.encoder.", strip="model.")
    assert "lm_head.weight" in expected and set(state) == set(expected)
    _assert_weights(state, expected)  # the layers merged, lm_head the source's own
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in expected.values())


def test_a_clip_pair_gets_its_merged_image_tower_and_its_own_text_tower(tmp_path):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2),
        vision_config=dict(image_size=8, patch_size=4, hidden_size=20, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    theta0 = pretrained_backbone(f"hf:{tmp_path / 'clip'}")  # backbone.net.* = vision_model.*
    delta = _random_delta(theta0, "")
    write_hf_model(tmp_path / "out", tmp_path / "clip", theta0, delta, ETA, META)
    state = _loads_cleanly(transformers.AutoModel, tmp_path / "out")
    expected = _expected(tmp_path / "clip" / "model.safetensors", delta, "backbone.net.",
                         strip="vision_model.")
    assert any(k.startswith("text_model.") for k in expected)
    _assert_weights(state, expected)


def test_a_model_transformers_renames_at_load_is_written_under_transformers_names(tmp_path):
    """transformers 5 loads ViT's file names (encoder.layer.0.attention.attention.query) into
    renamed modules (layers.0.attention.q_proj): the folder holds the modules' own names."""
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=24,
                                 num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    torch.manual_seed(0)
    transformers.ViTModel(cfg).save_pretrained(tmp_path / "vit")
    theta0 = pretrained_backbone(f"hf:{tmp_path / 'vit'}")
    delta = _random_delta(theta0, "")
    write_hf_model(tmp_path / "out", tmp_path / "vit", theta0, delta, ETA, META)
    state = _loads_cleanly(transformers.AutoModel, tmp_path / "out")
    source = transformers.AutoModel.from_pretrained(str(tmp_path / "vit")).state_dict()
    assert set(state) == set(source)
    expected = {k: v + ETA * delta[f"backbone.net.{k}"] for k, v in source.items()}
    _assert_weights(state, expected)


class Failing(dict):
    def __getitem__(self, key):
        if key.endswith("layer.3.output.dense.weight"):
            raise OSError("disk went away")
        return super().__getitem__(key)


def test_a_write_that_fails_leaves_the_earlier_folder_whole_and_nothing_else(tmp_path):
    src = _minilm()
    theta0 = pretrained_backbone(f"hf:{src}")
    out = tmp_path / "merged-hf"
    write_hf_model(out, src, theta0, {}, ETA, META)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OSError, match="disk went away"):
        write_hf_model(out, src, Failing(theta0), _random_delta(theta0, ""), ETA, META,
                       max_shard_bytes=10_000_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged-hf"]


@pytest.mark.parametrize("name, message", [
    ("backbone.net.conv.kernel", r"^merged Hugging Face folder: the run's parameters "
                                 r"\(backbone.net.conv.kernel, \.\.\.\) do not map onto .*tensor names"),
    ("backbone.net.conv.weight", r"^merged Hugging Face folder: 'backbone.net.conv.weight' has shape "
                                 r"\[2, 2\] but .*'embeddings.LayerNorm.weight' has \[384\]$"),
])
def test_names_or_shapes_that_do_not_fit_the_folder_are_one_line_before_anything_is_written(
        tmp_path, name, message):
    theta0 = {name: torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=message):
        write_hf_model(tmp_path / "out", _minilm(), theta0, {name: torch.ones(2, 2)}, ETA, META)
    assert not (tmp_path / "out").exists()


def test_only_hf_models_have_a_folder(monkeypatch):
    import huggingface_hub

    assert hf_model_folder("mnist-cnn") is None
    assert hf_model_folder(f"hf:{_minilm()}") == _minilm()
    cached = {"owner/minilm": str(_minilm())}  # stands in for the local Hugging Face cache

    def snapshot(ref, local_files_only):
        assert local_files_only  # never a download at write time
        if ref not in cached:
            raise huggingface_hub.errors.LocalEntryNotFoundError(ref)
        return cached[ref]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert hf_model_folder("hf:owner/minilm") == _minilm()
    assert hf_model_folder("hf:owner/absent") is None
    assert hf_folder_name("merged-ties.safetensors") == "merged-ties-hf"
