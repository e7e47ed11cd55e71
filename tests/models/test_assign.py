"""fl_merge/models/assign.py: theta0 + eta * Delta written into a model's own tensors, checked
against the formula written out in numpy and against torch's load_state_dict of
apply_update's new state dict (today's path); bad names or shapes change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fl_merge.core.task_vectors import MergeInputError, apply_update
from fl_merge.models.assign import WeightNamesError, assign_tensor_, assign_weights_

ETAS = [0.0, 0.3, 1.7, -0.55, 1 / 3]


def _numpy_update(base: torch.Tensor, delta: torch.Tensor, eta: float) -> np.ndarray:
    """theta0 + eta * Delta in numpy: in float32 (float64 for a float64 base), rounded to
    the base's dtype."""
    work = np.float64 if base.dtype == torch.float64 else np.float32
    b, d = base.numpy().astype(work), delta.numpy().astype(work)
    return (b + work(eta) * d).astype(base.numpy().dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("block", [7, 1 << 22])  # several blocks, and one
def test_a_tensor_is_theta0_plus_eta_delta_as_numpy_computes_it(dtype, block):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(13, 11, generator=g).to(dtype)
    delta = torch.randn(13, 11, generator=g, dtype=torch.float64).to(
        torch.float64 if dtype == torch.float64 else torch.float32)  # a float32 Delta for fp16
    before = delta.clone()
    for eta in ETAS:
        target = torch.empty(13, 11, dtype=dtype)
        assign_tensor_(target, base, delta, eta, block=block)
        assert np.array_equal(target.numpy(), _numpy_update(base, delta, eta))
        assert torch.equal(delta, before)  # the Delta is read, never written
    plain = torch.empty(13, 11, dtype=dtype)
    assign_tensor_(plain, base)
    assert torch.equal(plain, base)


def test_a_target_of_another_dtype_gets_the_rounded_value_cast():
    """A float32 model from fp16 weights holds what load_state_dict of the fp16 result gives."""
    g = torch.Generator().manual_seed(1)
    base, delta = torch.randn(50, generator=g).half(), torch.randn(50, generator=g)
    target = torch.empty(50)
    assign_tensor_(target, base, delta, 0.3, block=8)
    assert np.array_equal(target.numpy(), _numpy_update(base, delta, 0.3).astype(np.float32))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))


def _state(seed: int, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in _net().state_dict().items():
        out[prefix + k] = (torch.randn(v.shape, generator=g) if v.is_floating_point()
                           else torch.tensor(seed, dtype=v.dtype))
    return out


def test_a_module_equals_load_state_dict_of_apply_update():
    theta0 = {**_state(0), "head.weight": torch.ones(2, 2)}  # other names are left alone
    delta = {k: v for k, v in _state(1).items() if v.is_floating_point()}
    for eta in ETAS:
        model, reference = _net(), _net()
        assign_weights_(model, theta0, "backbone.", delta, eta)
        candidate = apply_update(theta0, delta, eta)
        reference.load_state_dict({k[len("backbone."):]: v for k, v in candidate.items()
                                   if k.startswith("backbone.")})
        got, want = model.state_dict(), reference.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    model = _net()
    assign_weights_(model, theta0, "backbone.")  # no delta: theta0 itself
    assert all(torch.equal(v, theta0["backbone." + k]) for k, v in model.state_dict().items())


def test_wrong_names_or_shapes_are_one_error_before_anything_is_written():
    theta0 = _state(0)
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lacking = {k: v for k, v in theta0.items() if k != "backbone.2.bias"}
    with pytest.raises(WeightNamesError, match=r"lack \['backbone.2.bias'\] and have \[\]"):
        assign_weights_(model, lacking, "backbone.")
    wrong = {**theta0, "backbone.2.weight": torch.zeros(3, 5)}
    with pytest.raises(WeightNamesError, match=r"'backbone.2.weight' has shape \[3, 5\] but the model's is \[3, 6\]"):
        assign_weights_(model, wrong, "backbone.")
    with pytest.raises(MergeInputError, match="update has parameters the base model lacks"):
        assign_weights_(model, theta0, "backbone.", {"backbone.9.weight": torch.zeros(1)}, 1.0)
    with pytest.raises(MergeInputError, match=r"update 'backbone.0.bias' has shape \[5\]"):
        assign_weights_(model, theta0, "backbone.", {"backbone.0.bias": torch.zeros(5)}, 1.0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
