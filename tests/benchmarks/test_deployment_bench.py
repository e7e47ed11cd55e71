"""benchmarks/deployment_1gb.py's pure parts: the LM's size arithmetic (checked against the
parameters transformers builds), the fine-tuned checkpoints (noise measured with numpy), the
idle and above-idle bookkeeping and the ratio table (numbers worked out by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import deployment_1gb as bench  # noqa: E402
import deployment_lm as lm  # noqa: E402
from deployment_procs import median_idle  # noqa: E402


def test_param_count_matches_the_model_transformers_builds():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = lm.lm_dims(64, 3)
    assert dims["intermediate_size"] == 192  # 8/3 * 64 = 170.7, rounded up to 64
    model = LlamaForCausalLM(LlamaConfig(**dims, tie_word_embeddings=True))
    unique = {id(p): p.numel() for p in model.parameters()}  # tied: the embedding counted once
    assert lm.lm_params(dims) == sum(unique.values())
    big = lm.lm_dims(2048, 12)  # the brief's ~1.3 GB shape, by the formula written out
    h, i, v = 2048, 5504, 32000
    assert big["intermediate_size"] == i
    assert lm.lm_params(big) == v * h + 12 * (4 * h * h + 3 * h * i + 2 * h) + h
    assert lm.largest_tensor_bytes(big) == 2 * v * h  # 125 MiB fp16
    assert lm.largest_tensor_bytes(big, 4) == 4 * v * h  # 250 MiB: its float32 Delta
    del torch


def test_dims_for_picks_the_nearest_layer_count_and_refuses_a_size_below_the_embeddings():
    for gib in (0.22, 1.25):
        dims = lm.dims_for(gib)
        near = abs(lm.lm_params(dims) * 2 - gib * 2**30)
        for other in (dims["num_hidden_layers"] - 1, dims["num_hidden_layers"] + 1):
            assert near <= abs(lm.lm_params(lm.lm_dims(2048, other)) * 2 - gib * 2**30)
    assert lm.dims_for(1.25)["num_hidden_layers"] == 12
    with pytest.raises(ValueError, match="below the 0.122 GiB of the embeddings"):
        lm.dims_for(0.1)


def test_checkpoints_are_the_base_plus_small_seeded_noise(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    base = {"a": torch.randn(300, 200).half(), "b": torch.ones(1000).half()}
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = lm.write_checkpoints(tmp_path / "base.safetensors", tmp_path, 2, noise=1e-2)
    assert lm.weights_bytes(tmp_path / "base.safetensors") == (300 * 200 + 1000) * 2
    c0, c1 = (load_file(str(p)) for p in paths)
    for key in base:
        assert c0[key].dtype == torch.float16 and c0[key].shape == base[key].shape
        d0 = c0[key].float().numpy() - base[key].float().numpy()
        d1 = c1[key].float().numpy() - base[key].float().numpy()
        assert 0.008 < np.std(d0) < 0.012 and abs(np.mean(d0)) < 2e-3
        assert np.corrcoef(d0.ravel(), d1.ravel())[0, 1] < 0.1  # a different seed per client


def test_task_rows_have_both_labels_and_the_csv_reads_back(tmp_path):
    import pandas as pd

    specs = lm.write_tasks(tmp_path, 2, 16, 8, 8)
    assert specs[1] == f"csv:{tmp_path / 'task1.csv'}?train=16&val=8&test=8"
    table = pd.read_csv(tmp_path / "task0.csv")
    assert len(table) == 32 and set(table["label"]) == {"yes", "no"} and table["text"].is_unique


def test_median_idle_counts_a_missing_role_as_zero():
    samples = [(1, "n", "supernode", 100, 0), (2, "n", "supernode", 120, 0), (3, "n", "supernode", 110, 0),
               (3, "n", "superexec", 50, 0), (1, "x", "supernode", 999, 0)]
    assert median_idle(samples, "n") == {"superexec": 0.0, "supernode": 110.0}


def test_rows_take_peak_minus_idle_and_the_phase_of_the_peak():
    peaks = {
        "train": {"superlink/serverapp": (300.0, 0), "superlink/superlink": (250.0, 0),
                  "supernode0/total": (900.0, 0)},
        "validation": {"superlink/serverapp": (500.0, 0), "superlink/superlink": (150.0, 0),
                       "supernode0/total": (700.0, 0)},
        "whole run": {"superlink/serverapp": (500.0, 0), "superlink/superlink": (250.0, 0),
                      "supernode0/total": (900.0, 0)},
    }
    idle = {"superlink": {"superlink": 200.0, "superexec": 120.0},
            "supernode0": {"supernode": 100.0, "superexec": 80.0}}
    rows = bench.process_rows(peaks, idle, 1)
    assert [(r["process"], r["idle_mb"], r["above_mb"], r["phase"]) for r in rows] == [
        ("ServerApp", 0.0, 500.0, "validation"),  # no ServerApp when idle
        ("SuperLink", 200.0, 50.0, "train"),
        ("SuperNode 0", 180.0, 720.0, "train"),  # supernode + its superexec
    ]
    assert bench.above_idle(90.0, 100.0) == 0.0
    assert bench.ratio_cells(rows[0], 400.0) == ("1.25x", True)  # 500 / 400 <= 1.5
    assert bench.ratio_cells(rows[2], 200.0) == ("3.60x", False)  # 720 / 200 > 2.5


def test_markdown_table_has_a_row_per_process_and_the_run_outcomes():
    rows = [{"process": "ServerApp", "above_mb": 150.0, "phase": "write"},
            {"process": "SuperLink", "above_mb": 60.0, "phase": "train"}]
    results = {"fl-merge": {"rows": rows, "ok": True, "seconds": 12.4, "stopped": ""},
               "fedavg": {"rows": rows, "ok": False, "seconds": 30.0, "stopped": "watchdog at 16.2 GiB in phase train"}}
    text = bench.markdown(results, 100.0).splitlines()
    assert text[2] == "| ServerApp | <= 1.5x | 1.50x | write | 1.50x | write |"
    assert text[3] == "| SuperLink | <= 0.5x | 0.60x (over) | train | 0.60x (over) | train |"
    assert "12 s, finished" in text[4] and "stopped: watchdog at 16.2 GiB in phase train" in text[4]


def test_idle_is_settled_only_when_every_group_holds_still_with_the_same_processes():
    from deployment_procs import settled

    a = {"n": {"supernode": 130.0, "superexec": 26.0}}
    b = {"n": {"supernode": 131.0, "superexec": 125.0}}  # its SuperExec still starting
    c = {"n": {"supernode": 132.0, "superexec": 127.0}}
    assert not settled(None, a, 10) and not settled(a, b, 10) and settled(b, c, 10)
    assert not settled({"n": {"supernode": 130.0}}, {"n": {"supernode": 130.0, "superexec": 0.0}}, 10)


def test_peak_step_names_the_last_server_step_logged_before_the_peak():
    samples = [(1.0, "superlink", "superlink", 100.0, 90.0), (2.0, "superlink", "superlink", 900.0, 880.0),
               (3.0, "superlink", "superlink", 300.0, 290.0), (2.0, "supernode0", "supernode", 5000.0, 0.0)]
    steps = [(0.5, "fl-merge chunks: theta0 group 1/2"), (1.5, "fl-merge chunks: update group 1"),
             (2.5, "fl-merge chunks: update group 2")]
    assert bench.peak_step(samples, "superlink", "superlink", steps) == (900.0, 2.0, "fl-merge chunks: update group 1")
    assert bench.peak_step(samples, "superlink", "superlink", []) == (900.0, 2.0, "")
    assert bench.peak_step(samples, "nobody", "superlink", steps) == (0.0, 0.0, "")
