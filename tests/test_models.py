"""Model registry: every built-in model builds, attaches per-task heads, and merges exactly its
backbone parameters."""

from __future__ import annotations

import torch

from fl_merge.models import MODELS, build_model, is_merged_key


def test_wide_mlp_backbone_is_over_200mb_and_heads_attach():
    assert "wide-mlp" in MODELS
    model = build_model("wide-mlp", num_classes=7)
    state = model.state_dict()
    merged = {k: v for k, v in state.items() if is_merged_key(k)}
    assert sum(v.numel() * v.element_size() for v in merged.values()) >= 200 * 2**20
    assert set(state) - set(merged) == {"head.weight", "head.bias"}
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 7)
