"""LiNeS (fl_merge/merging/lines.py) through the round, driven by test_strategy's FakeGrid:
each LiNeS setting is one more candidate, scored at the one eta of lambda 1, and the chosen
update is the method's Delta scaled per layer (written out here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fl_merge.core.task_vectors import task_vector
from fl_merge.methods import merge
from fl_merge_strategies import OneShotMerge
from test_strategy import FakeGrid, _run

pytestmark = pytest.mark.usefixtures("message_identity")

THETA0 = {"backbone.blocks.0.w": torch.zeros(3, 2), "backbone.blocks.1.w": torch.zeros(3, 2),
          "backbone.blocks.2.b": torch.zeros(2), "backbone.norm.w": torch.zeros(2)}


def _reply(i: int) -> RecordDict:
    g = torch.Generator().manual_seed(i)
    state = {k: torch.randn(v.shape, generator=g) for k, v in THETA0.items()}
    state.update({"head.weight": torch.randn(4, 2, generator=g), "head.bias": torch.zeros(4)})
    metrics = {"num-examples": 10, "local-steps": 5, "partition-id": i, "finetuned-val-accuracy": 0.8,
               "finetuned-accuracy": 0.8, "finetuned-loss": 0.1, "fl-merge-protocol": 1}
    return RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})


def test_each_lines_setting_is_a_candidate_and_the_choice_is_scaled_per_layer():
    replies = {100 + i: _reply(i) for i in range(3)}
    # candidate 1 (beta 0.6) scores best on validation at its one eta > 0
    grid = FakeGrid(replies, score=lambda i, eta, split: 0.5 + (0.1 * i if eta > 0 else 0.0))
    s = OneShotMerge(method="ties", method_params={"density": 0.5}, search="paper",
                     lines={"alpha": 0.2, "beta": [0.0, 0.6]})
    r = _run(s, grid, {k: v.clone() for k, v in THETA0.items()})
    assert list(r.candidates) == ["ties[lines.alpha=0.2,lines.beta=0]", "ties[lines.alpha=0.2,lines.beta=0.6]"]
    assert all(c.etas == [0.0, 1.0] for c in r.candidates.values())  # TIES: lambda 1 is eta 1
    taus = [task_vector(replies[100 + i]["arrays"].to_torch_state_dict(), THETA0, list(THETA0))
            for i in range(3)]
    ties = merge("ties", taus, names=[f"partition {i}" for i in range(3)], density=0.5)
    by_hand = {"backbone.blocks.0.w": 0.2, "backbone.blocks.1.w": 0.5, "backbone.blocks.2.b": 0.8,
               "backbone.norm.w": 0.2}  # 0.2 + 0.6 (l - 1) / 2; no layer index: alpha
    for k, lam in by_hand.items():
        np.testing.assert_allclose(r.delta[k].numpy(), lam * ties[k].numpy(), rtol=1e-6)


def test_a_pattern_finding_no_layers_stops_before_any_client_trains(tmp_path):
    from safetensors.torch import save_file

    from fl_merge.config.run_config import ConfigError, RunConfig
    from fl_merge_strategies.server_app import load_theta0

    save_file({"backbone.blocks.0.w": torch.zeros(2), "backbone.blocks.1.w": torch.zeros(2),
               "head.w": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    base = {"base_checkpoint": str(tmp_path / "m.safetensors")}
    assert set(load_theta0(RunConfig(**base, lines="beta=0.5").resolve())) == \
        {"backbone.blocks.0.w", "backbone.blocks.1.w", "head.w"}
    with pytest.raises(ConfigError, match=r"lines pattern .* matches no parameter name"):
        load_theta0(RunConfig(**base, lines=r"beta=0.5 pattern=layers\.(\d+)\.").resolve())
    with pytest.raises(ConfigError, match=r"finds one layer only"):
        load_theta0(RunConfig(**base, lines=r"beta=0.5 pattern=blocks\.(0)\.").resolve())
