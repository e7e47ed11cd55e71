"""Per-client numbers: FedNova normalisers fall back to local steps per client."""

from __future__ import annotations

import pytest
import torch

from fl_merge.merging.per_client import normalisers_tensor


def test_missing_normalisers_fall_back_to_steps_per_client():
    steps = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    with pytest.warns(UserWarning, match="FedNova normaliser missing"):
        a = normalisers_tensor([55.0, None, 7.5], steps, 3)
    assert a.tolist() == [55.0, 20.0, 7.5]
    assert normalisers_tensor(None, None, 3) is None
    assert normalisers_tensor([1, 2, 3], None, 3).tolist() == [1.0, 2.0, 3.0]
