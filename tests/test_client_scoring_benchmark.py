"""benchmarks/client_scoring_memory.py sizes its generated model as asked: the LlamaModel its
config builds (on the meta device, no memory) has about --size-gb * 1e9 bytes in fp16."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

spec = importlib.util.spec_from_file_location(
    "client_scoring_memory", Path(__file__).resolve().parents[1] / "benchmarks" / "client_scoring_memory.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("size_gb, hidden", [(1.0, 2048), (0.5, 1024)])
def test_the_generated_model_has_the_asked_size(size_gb, hidden):
    with torch.device("meta"):
        model = transformers.LlamaModel(bench.llama_config(size_gb, hidden))
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())
    assert abs(fp16_bytes / (size_gb * 1e9) - 1) < 0.1
