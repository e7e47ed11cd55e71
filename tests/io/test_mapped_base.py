"""A large-model round's theta0 memory-mapped from its source's own safetensors files
(fl_merge/io/mapped_base.py): for an hf: folder, bit for bit what transformers loads
(`pretrained_backbone`, the reference) under the same names and order, without reading a
tensor; folders where transformers would give other values fall back with a reason; a
safetensors base-checkpoint the same as `load_checkpoint` reads it; the round keeps such a
theta0 where it lies, and the checks that read theta0's names and shapes still run on it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.io.checkpoints import Checkpoint
from fl_merge.io.mapped_base import SourceState, mapped_hf_backbone
from fl_merge.models.registry import pretrained_backbone
from fl_merge.round.base import load_checkpoint
from fl_merge.round.outcome import new_round
from fl_merge.round.settings import RoundSettings

transformers = pytest.importorskip("transformers")

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _minilm() -> Path:
    from fl_merge.models.hub import minilm_path

    return Path(minilm_path())


def _llama(folder: Path, dtype: torch.dtype | None = None, tie: bool = False, **save) -> Path:
    """A tiny LlamaForCausalLM (so the file's names carry 'model.', AutoModel's do not)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=500, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **save)
    for name in TOKENIZER_FILES:
        shutil.copyfile(_minilm() / name, folder / name)
    return folder


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(state, reference) -> None:
    assert list(state) == list(reference)  # names and order
    for k, want in reference.items():
        got = state[k]
        assert got.dtype == want.dtype and got.shape == want.shape, k
        assert torch.equal(_bits(got), _bits(want)), k


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {"fp16-tied": _llama(root / "fp16", torch.float16, tie=True),
           "fp32-sharded": _llama(root / "sharded", max_shard_size="20KB")}
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=8, patch_size=4, hidden_size=20, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8)).save_pretrained(root / "clip")
    out["clip"] = root / "clip"
    return out


@pytest.mark.parametrize("name", ["fp16-tied", "fp32-sharded", "clip", "minilm"])
def test_an_hf_folder_maps_to_what_transformers_loads_bit_for_bit(folders, name, monkeypatch):
    folder = _minilm() if name == "minilm" else folders[name]
    reference = pretrained_backbone(f"hf:{folder}")  # AutoModel.from_pretrained, wrapped
    if name == "fp32-sharded":
        assert len(list(folder.glob("model-*.safetensors"))) >= 2

    def no_reads(*a, **k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Checkpoint, "read_into", no_reads)  # names, shapes, dtypes: headers only
    state, how = mapped_hf_backbone(f"hf:{folder}")
    assert isinstance(state, SourceState), how
    assert how.startswith("memory-mapped from")
    _assert_same(state, reference)


def test_a_mapped_tensor_is_the_files_bytes_and_writing_to_it_leaves_the_file(folders):
    folder = folders["fp16-tied"]
    state, _ = mapped_hf_backbone(f"hf:{folder}")
    key = "backbone.encoder.embed_tokens.weight"
    t = state[key]
    t.add_(1.0)  # a private copy-on-write page, as MappedState's
    on_disk = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(_bits(state[key]), _bits(on_disk))


def test_folders_transformers_changes_at_load_fall_back_with_a_reason(tmp_path, monkeypatch):
    # ViT: transformers 5 loads its file's names into renamed modules
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=48)).save_pretrained(tmp_path / "vit")
    state, why = mapped_hf_backbone(f"hf:{tmp_path / 'vit'}")
    assert state is None and "names are not the folder's tensor names" in why
    # float32 weights whose config says float16: transformers casts, the file's bytes differ
    folder = _llama(tmp_path / "cast")
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"dtype": "float32"', '"dtype": "float16"'))
    state, why = mapped_hf_backbone(f"hf:{folder}")
    assert state is None and "name, shape or dtype" in why
    # only a torch pickle (pytorch_model.bin): read whole by the reader, nothing to map
    (tmp_path / "bin").mkdir()
    torch.save(load_file(str(folder / "model.safetensors")), tmp_path / "bin" / "pytorch_model.bin")
    shutil.copyfile(folder / "config.json", tmp_path / "bin" / "config.json")
    assert mapped_hf_backbone(f"hf:{tmp_path / 'bin'}")[0] is None
    # a load-time converter (split, fuse, permute) changes values
    import transformers.conversion_mapping as cm
    from transformers.core_model_loading import Chunk, WeightConverter

    fused = WeightConverter(source_patterns="mlp.gate_up_proj.weight",
                            target_patterns=["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                            operations=[Chunk(dim=0)])
    monkeypatch.setattr(cm, "get_model_conversion_mapping", lambda model, *a, **k: [fused])
    state, why = mapped_hf_backbone(f"hf:{_llama(tmp_path / 'conv')}")
    assert state is None and why == "transformers converts its tensors at load time (WeightConverter)"
    # not a local folder
    assert mapped_hf_backbone("hf:someone/some-model") == \
        (None, "someone/some-model is a hub id, not a local folder")
    # a model that cannot be built without weights: left to transformers, never an error here
    monkeypatch.setattr(cm, "get_model_conversion_mapping", lambda model, *a, **k: 1 / 0)
    state, why = mapped_hf_backbone(f"hf:{tmp_path / 'conv'}")
    assert state is None and why == "it could not be mapped (ZeroDivisionError: division by zero)"


def _base_checkpoint(tmp_path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {"backbone.b.w": torch.randn(6, 4, generator=g).half(),
             "backbone.a.w": torch.randn(3, generator=g), "head.w": torch.randn(2, 6, generator=g)}
    save_file(state, str(tmp_path / "base.safetensors"))
    return state


def test_a_safetensors_base_checkpoint_maps_as_load_checkpoint_reads_it(tmp_path):
    state = _base_checkpoint(tmp_path)
    read = load_checkpoint(tmp_path / "base.safetensors")
    mapped = load_checkpoint(tmp_path / "base.safetensors", mapped=True)
    assert isinstance(mapped, SourceState) and isinstance(read, dict)
    _assert_same(mapped, read)
    assert {k: v.dtype for k, v in mapped.items()} == {k: v.dtype for k, v in state.items()}
    torch.save(state, tmp_path / "base.pt")  # a pickle is read whole either way
    assert isinstance(load_checkpoint(tmp_path / "base.pt", mapped=True), dict)


def test_a_spilling_round_keeps_a_mapped_theta0_where_it_lies(tmp_path):
    state = _base_checkpoint(tmp_path)
    mapped = load_checkpoint(tmp_path / "base.safetensors", mapped=True)
    r = new_round(RoundSettings.build(spill_dir=str(tmp_path / "spill")), mapped)
    assert r.theta0 is mapped and list(r.store.path.iterdir()) == []  # no copy in the store
    copied = new_round(RoundSettings.build(spill_dir=str(tmp_path / "spill")), dict(state))
    assert [p.name for p in copied.store.path.iterdir()] == ["0001-theta0.safetensors"]
    _assert_same(copied.theta0, state)
    small = new_round(RoundSettings.build(), mapped)  # not spilling: an in-memory clone
    assert isinstance(small.theta0, dict)
    _assert_same(small.theta0, load_checkpoint(tmp_path / "base.safetensors"))


def test_the_checks_on_theta0s_names_and_shapes_run_on_a_mapped_theta0(tmp_path):
    from fl_merge_strategies.server_app import load_theta0

    _base_checkpoint(tmp_path)
    base = dict(base_checkpoint=str(tmp_path / "base.safetensors"), merge_keys="backbone.*")
    theta0 = load_theta0(RunConfig(**base, chunk_mib=1.0).resolve(), mapped=True)
    assert isinstance(theta0, SourceState) and sorted(theta0) == ["backbone.a.w", "backbone.b.w", "head.w"]
    with pytest.raises(ConfigError, match=r"merge-keys \['enc\.\*'\] match none"):
        load_theta0(RunConfig(**{**base, "merge_keys": "enc.*"}).resolve(), mapped=True)
    with pytest.raises(ConfigError, match=r"is smaller than the base model's tensor 'head.w' \(48 bytes"):
        load_theta0(RunConfig(**base, chunk_mib=0.00001).resolve(), mapped=True)


def test_an_hf_runs_checks_read_the_mapped_theta0(folders, tmp_path):
    from fl_merge_strategies.server_app import load_theta0

    rows = "text,label\n" + "".join(f"word{i} more,{'yes' if i % 2 else 'no'}\n" for i in range(12))
    (tmp_path / "t.csv").write_text(rows)
    folder = folders["fp16-tied"]
    run = dict(model=f"hf:{folder}", tasks=f"csv:{tmp_path / 't.csv'}?train=6&val=3&test=3", num_clients=1)
    theta0 = load_theta0(RunConfig(**run, chunk_mib=1.0).resolve(), mapped=True)
    assert isinstance(theta0, SourceState)
    _assert_same(theta0, pretrained_backbone(f"hf:{folder}"))
    # the embeddings, 500 x 16 fp16 = 16000 bytes, do not fit a 0.01 MiB chunk: one line, as before
    with pytest.raises(ConfigError, match=r"smaller than the base model's tensor "
                                          r"'backbone.encoder.embed_tokens.weight' \(16000 bytes"):
        load_theta0(RunConfig(**run, chunk_mib=0.01).resolve(), mapped=True)


def test_a_mapped_base_stays_the_file_it_opened_when_its_path_is_replaced(tmp_path):
    """An atomic writer (temp file + rename) replacing the base's path, e.g. a run writing
    merged.safetensors over the file its base-checkpoint names, does not change theta0."""
    state = _base_checkpoint(tmp_path)
    mapped = load_checkpoint(tmp_path / "base.safetensors", mapped=True)
    save_file({k: v + 1 for k, v in state.items()}, str(tmp_path / "new.safetensors"))
    (tmp_path / "new.safetensors").replace(tmp_path / "base.safetensors")
    for k, v in state.items():
        assert torch.equal(mapped[k], v), k
