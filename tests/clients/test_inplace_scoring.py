"""A client scores every candidate theta0 + eta * Delta of a message on ONE model whose weights
are set in place (clients/training.py CandidateModel) instead of a new state dict and a new
model per candidate (issue 28). The scores equal those of the old path, written out here:
apply_update's state dict loaded into a freshly built model with torch's load_state_dict
(and a probe head fitted, or the state's head loaded), with the task's head given or not, two
Deltas and several etas; the reused model's weights equal theta0 + eta * Delta in numpy. An
fp16 hf: model stays fp16 in every path (theta0, the built model, the candidates)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fl_merge.core.task_vectors import apply_update
from fl_merge.models.evaluation import evaluate_examples
from fl_merge.models.registry import build_model, pretrained_backbone
from fl_merge.tasks.registry import SplitSizes, TaskData, load_task
from fl_merge_clients.grid_scoring import score_grid
from fl_merge_clients.training import CandidateModel, fit_probe_head

ETAS = [0.0, 0.5, 1.0, 1.5]


def _old_path(model_name, task, state, delta, eta, seed):
    """Today's (before issue 28) candidate: a new state dict, a new model, load_state_dict."""
    s = apply_update(state, delta, eta)
    model = build_model(model_name, task.num_classes)
    model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in s.items() if k.startswith("backbone.")})
    head = {k[len("head."):]: v for k, v in s.items() if k.startswith("head.")}
    if head and tuple(head["weight"].shape) == tuple(model.head.weight.shape):
        model.head.load_state_dict(head)
    else:
        fit_probe_head(model, task, seed)
    return model


def _old_scores(model_name, task, state, deltas, grids, seed):
    out = {f"{s}-{m}": [] for s in ("val", "test") for m in ("accuracy", "loss")}
    correct = []
    for delta, etas in zip(deltas, grids):
        for eta in etas:
            model = _old_path(model_name, task, state, delta, eta, seed)
            for split in ("val", "test"):
                acc, loss, right = evaluate_examples(model, getattr(task, split))
                out[f"{split}-accuracy"].append(acc)
                out[f"{split}-loss"].append(loss)
                if split == "test":
                    correct += right
    return {**out, "test-correct": correct}


def _deltas(theta0, seeds, scale=0.05):
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        out.append({k: scale * torch.randn(v.shape, generator=g) * v.float().std().clamp_min(1e-3)
                    for k, v in theta0.items() if v.is_floating_point()})
    return out


def _numpy_candidate(theta0, delta, eta):
    out = {}
    for k, v in theta0.items():
        if k not in delta:
            out[k] = v.numpy()
            continue
        b, d = v.numpy().astype(np.float32), delta[k].numpy().astype(np.float32)
        out[k] = (b + np.float32(eta) * d).astype(v.numpy().dtype)
    return out


@pytest.mark.parametrize("with_head", [True, False])
def test_in_place_scores_equal_a_new_model_per_candidate(theta0, with_head):
    task = load_task("rotate90", 0, SplitSizes(train=100, val=60, test=80))
    feature_dim = build_model("mnist-cnn", 10).head.weight.shape[1]
    g = torch.Generator().manual_seed(3)
    head = {"head.weight": 0.1 * torch.randn(10, feature_dim, generator=g), "head.bias": torch.zeros(10)}
    state = {**theta0, **(head if with_head else {})}  # without: a probe head per candidate
    deltas = _deltas(dict(theta0), [1, 2])
    grids = [ETAS, [0.0, 2.0]] if with_head else [[1.0], [2.0]]  # probe fits are slow
    config = {"etas": [e for grid in grids for e in grid], "etas-per-delta": [len(e) for e in grids]}
    candidate = CandidateModel("mnist-cnn", task, state, seed=5)
    got = score_grid(config, task, [lambda d=d: d for d in deltas], candidate)
    assert got == _old_scores("mnist-cnn", task, state, deltas, grids, seed=5)
    # after the last candidate (delta 1, eta 2.0) the one model holds theta0 + 2 * Delta_1
    want = _numpy_candidate(dict(theta0), deltas[1], 2.0)
    weights = candidate.model.state_dict()
    assert all(np.array_equal(weights[k].numpy(), want[k]) for k in theta0)
    assert with_head == torch.equal(weights["head.weight"], head["head.weight"])


def _fp16_llama(folder):
    """A tiny fp16 causal LM built from a config (transformers), with MiniLM's tokenizer."""
    transformers = pytest.importorskip("transformers")
    from fl_merge.models.hub import minilm_path

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=128)
    transformers.LlamaModel(config).to(torch.float16).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, folder / name)
    return f"hf:{folder}"


def _text_task():
    from fl_merge.data.offline import encode_texts

    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "grim"]
    texts = [f"{w} day number {i}" for i, w in enumerate(words * 3)]
    x, y = encode_texts(texts), torch.tensor([i % 2 for i in range(len(texts))])
    return TaskData("toy", 2, TensorDataset(x, y), TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:]))


def test_an_fp16_hf_model_stays_fp16_and_scores_as_before(tmp_path):
    name = _fp16_llama(tmp_path / "llama")
    theta0 = pretrained_backbone(name)
    assert {v.dtype for v in theta0.values()} == {torch.float16}  # the server's theta0
    built = build_model(name, 2)
    assert {p.dtype for p in built.backbone.parameters()} == {torch.float16}
    task = _text_task()
    # features leave the fp16 backbone as float32, close to the float32 computation
    reference = build_model(name, 2).float()
    reference.backbone.load_state_dict({k[len("backbone."):]: v.float() for k, v in theta0.items()})
    built.backbone.load_state_dict({k[len("backbone."):]: v for k, v in theta0.items()})
    with torch.no_grad():
        feats, want = built.backbone(task.test.tensors[0]), reference.backbone(task.test.tensors[0])
    assert feats.dtype == torch.float32 and torch.allclose(feats, want, atol=2e-2, rtol=2e-2)
    # float32 Deltas on the fp16 base: the candidates stay fp16, the scores are the old path's
    deltas = _deltas(theta0, [7])
    assert {v.dtype for v in deltas[0].values()} == {torch.float32}
    state = {**theta0, "head.weight": torch.randn(2, 32, generator=torch.Generator().manual_seed(4)),
             "head.bias": torch.zeros(2)}
    candidate = CandidateModel(name, task, state, seed=0)
    got = score_grid({"etas": [0.0, 1.0, 3.0]}, task, [lambda: deltas[0]], candidate)
    assert got == _old_scores(name, task, state, deltas, [[0.0, 1.0, 3.0]], seed=0)
    weights = candidate.model.backbone.state_dict()
    want_np = _numpy_candidate(theta0, deltas[0], 3.0)
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert all(np.array_equal(weights[k[len("backbone."):]].numpy(), want_np[k]) for k in theta0)
