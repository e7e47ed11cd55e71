"""Where `fl-merge merge` writes (fl_merge/io/merge_output.py), as a user meets it: a tiny
Hugging Face model saved with save_pretrained (no download) is merged into a folder that
transformers.AutoModel loads with the merged weights; a second merge into it is refused
unless --overwrite, which replaces the folder whole."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from fl_merge.cli.merge import main
from fl_merge.core.files import remove_stale_temps, temp_path
from fl_merge.core.task_vectors import MergeInputError
from fl_merge.io.checkpoints import Checkpoint
from fl_merge.io.merge_output import check_output, model_files

ROOT = Path(__file__).resolve().parents[2]
# What a merged folder holds: the weights and the base's config, tokenizer and generation config.
FOLDER = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json"]
WORDS = ["apple", "pear", "plum", "fig", "lime", "kiwi", "date", "yuzu"]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModel.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_pool(tmp_path_factory):
    """A tiny BERT base folder as save_pretrained writes it (config.json, model.safetensors),
    with a tokenizer, a generation config and a model card, and two fine-tunes of it."""
    tmp = tmp_path_factory.mktemp("hf")
    cfg = transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)
    torch.manual_seed(0)
    base = tmp / "base"
    transformers.BertModel(cfg).save_pretrained(base)
    (tmp / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizer(vocab_file=str(tmp / "vocab.txt")).save_pretrained(base)
    transformers.GenerationConfig(max_new_tokens=5).save_pretrained(base)
    (base / "README.md").write_text("# the base's model card\n")
    models = []
    for i in range(2):
        m = transformers.AutoModel.from_pretrained(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        m.save_pretrained(tmp / f"ft{i}")
        models.append(tmp / f"ft{i}")
    return tmp, base, models


def task_arithmetic(base: Path, models: list[Path], lam: float) -> dict[str, torch.Tensor]:
    """theta0 + lam * sum_i (theta_i - theta0) (Ilharco et al. 2023), from transformers' own load."""
    theta0, thetas = _state(base), [_state(m) for m in models]
    return {k: v + lam * sum(t[k] - v for t in thetas) if v.is_floating_point() else v
            for k, v in theta0.items()}


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_a_merged_folder_loads_with_transformers_with_the_bases_tokenizer(hf_pool, tmp_path):
    _, base, models = hf_pool
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "fl_merge", "merge", "--base", base, "--models", *models,
                           "--method", "task_arithmetic", "--lambda", "0.3", "--out", out],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == FOLDER
    got, want = _state(out), task_arithmetic(base, models, 0.3)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    text = " ".join(WORDS[:4])
    tokenizer = transformers.AutoTokenizer.from_pretrained
    assert tokenizer(out)(text) == tokenizer(base)(text)
    assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folder left


def test_a_second_merge_is_refused_and_overwrite_leaves_no_stale_shard(hf_pool, tmp_path, capsys):
    _, base, models = hf_pool
    out = tmp_path / "merged"
    common = ["--base", base, "--models", *models, "--method", "task_arithmetic", "--out", out]
    assert run([*common, "--lambda", 0.3, "--max-shard-size", "2KB"], capsys)[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "model.safetensors.index.json" in first and len([n for n in first if "-of-" in n]) > 1
    rc, err = run([*common, "--lambda", 0.5], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "not empty" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # untouched
    assert run([*common, "--lambda", 0.5, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == FOLDER
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    want = task_arithmetic(base, models, 0.5)
    transformers_reads = _state(out)
    with Checkpoint(out) as ck:  # fl-merge's own reader, which prefers an index when one is there
        for k in want:
            torch.testing.assert_close(ck.get(k), want[k])
            assert torch.equal(ck.get(k), transformers_reads[k])


def test_a_failed_overwrite_leaves_the_earlier_folder_as_it_was(hf_pool, tmp_path, capsys):
    _, base, models = hf_pool
    out = tmp_path / "merged"
    assert run(["--base", base, "--models", *models, "--method", "task_arithmetic", "--lambda", 0.3,
                "--out", out], capsys)[0] == 0
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = load_file(str(models[1] / "model.safetensors"))
    bad["encoder.layer.1.output.dense.weight"][0, 0] = float("nan")  # a late tensor: earlier ones written
    (tmp_path / "bad").mkdir()
    save_file(bad, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
    rc, err = run(["--base", base, "--models", models[0], tmp_path / "bad", "--method", "task_arithmetic",
                   "--lambda", 0.5, "--out", out, "--overwrite"], capsys)
    assert rc == 2 and "encoder.layer.1.output.dense.weight" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "merged"]  # no staging folder left


def test_a_file_output_is_refused_and_overwritten_in_either_layout(hf_pool, tmp_path, capsys):
    _, base, models = hf_pool
    out = tmp_path / "merged.safetensors"
    (tmp_path / "notes.txt").write_text("the user's own file\n")
    common = ["--base", base, "--models", *models, "--method", "task_arithmetic", "--out", out]
    assert run([*common, "--lambda", 0.3, "--max-shard-size", "2KB"], capsys)[0] == 0
    assert not out.exists() and (tmp_path / "merged.safetensors.index.json").is_file()
    rc, err = run([*common, "--lambda", 0.5], capsys)
    assert rc == 2 and "exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert run([*common, "--lambda", 0.5, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors", "notes.txt"]
    got, want = load_file(str(out)), task_arithmetic(base, models, 0.5)
    assert all(torch.allclose(got[k], want[k]) for k in want)


def test_overwrite_never_replaces_an_input(hf_pool, capsys):
    _, base, models = hf_pool
    before = {p.name: p.read_bytes() for p in models[0].iterdir()}
    rc, err = run(["--base", base, "--models", *models, "--method", "task_arithmetic", "--lambda", 0.3,
                   "--out", models[0], "--overwrite"], capsys)
    assert rc == 2 and "would replace the input" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in models[0].iterdir()} == before


def test_dtype_is_written_into_the_copied_config(hf_pool, tmp_path, capsys):
    _, base, models = hf_pool
    out = tmp_path / "bf16"
    assert run(["--base", base, "--models", *models, "--method", "task_arithmetic", "--lambda", 0.3,
                "--dtype", "bf16", "--out", out], capsys)[0] == 0
    model = transformers.AutoModel.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_a_lone_base_file_gives_a_folder_without_config_and_says_so(hf_pool, tmp_path, capsys):
    _, base, models = hf_pool
    lone = tmp_path / "theta0.safetensors"
    lone.write_bytes((base / "model.safetensors").read_bytes())
    out = tmp_path / "merged"
    rc = main([str(a) for a in ["--base", lone, "--models", *models, "--method", "task_arithmetic",
                                "--lambda", 0.3, "--out", out]])
    assert rc == 0 and "no config.json" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_model_files_are_the_non_weight_files(tmp_path):
    for name in ("config.json", "tokenizer.json", "vocab.txt", "merges.txt", "generation_config.json",
                 "special_tokens_map.json", "model.safetensors", "model-00001-of-00002.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                 "tf_model.h5", "flax_model.msgpack", "training_args.bin", "README.md", ".gitattributes"):
        (tmp_path / name).write_text("x")
    (tmp_path / "onnx").mkdir()
    assert [p.name for p in model_files(tmp_path)] == ["config.json", "generation_config.json", "merges.txt",
                                                      "special_tokens_map.json", "tokenizer.json",
                                                      "vocab.txt"]


def test_output_checks_name_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dir.safetensors").mkdir()
    check_output(tmp_path / "empty", False, [])  # an empty folder is no earlier output
    check_output(tmp_path / "new" / "deeper", False, [])  # created when written
    for out, needle in ((tmp_path / "a_file", "is a file; a path without .safetensors names a folder"),
                        (tmp_path / "dir.safetensors", "is a folder; a path ending in .safetensors"),
                        (tmp_path / "a_file" / "x", "a_file is a file, not a folder")):
        with pytest.raises(MergeInputError, match=needle):
            check_output(out, True, [])
    monkeypatch.chdir(tmp_path / "empty")  # a new folder in its place would leave the shell nowhere
    for out in (".", ".."):
        with pytest.raises(MergeInputError, match="is the current folder or holds it"):
            check_output(out, False, [])


def test_a_dead_merges_staging_folder_is_removed_and_a_live_ones_kept(tmp_path):
    live = temp_path(tmp_path / "merged")
    live.mkdir()
    dead = tmp_path / live.name.replace(f"-{os.getpid()}-", "-999999999-")
    dead.mkdir()
    (dead / "model.safetensors").write_text("half")
    assert remove_stale_temps(tmp_path) == [dead]
    assert live.is_dir() and not dead.exists()
