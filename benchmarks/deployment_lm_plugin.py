"""Run-config `plugins="deployment_lm_plugin"` (benchmarks/deployment_1gb.py): registers model
`bench-lm`, the fp16 LM in folder $FL_MERGE_BENCH_LM, as `hf:<that folder>` is registered
(fl_merge.models.hf.hf_spec, text encoder, mean-pooled) except that the pooled features are
cast to float32 for the task head. Why: with an fp16 `hf:` model the float32 head gets fp16
features and every client fails with "mat1 and mat2 must have the same dtype, but got Half and
Float" (fl_merge/models/hf.py SentenceEncoder.forward returns the encoder's dtype).
"""

from __future__ import annotations

import os

import torch

from fl_merge.models.hf import SentenceEncoder, hf_config, hf_source
from fl_merge.models.registry import ModelSpec, register_model

NAME = "bench-lm"
FOLDER_VAR = "FL_MERGE_BENCH_LM"


class FloatFeatures(SentenceEncoder):
    """SentenceEncoder whose pooled features are float32 (the head's dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).float()


def _spec() -> ModelSpec:
    folder = os.environ.get(FOLDER_VAR, "")
    if not folder:
        raise ValueError(f"plugin deployment_lm_plugin: set {FOLDER_VAR} to the LM's folder")
    src = hf_source(NAME, folder)
    return ModelSpec(NAME, lambda: FloatFeatures(src, False), int(hf_config(src).hidden_size),
                     input_kind="text", load_pretrained=lambda: FloatFeatures(src, True),
                     requires=("transformers",))


register_model(_spec())
