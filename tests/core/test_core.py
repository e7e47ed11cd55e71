"""Task vectors, merge entry point and the TA == one-shot FedAvg equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge import MergeInputError, apply_update, eta_for_task_arithmetic, merge, split_state, task_vector
from fl_merge.models.registry import build_model, is_merged_key


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "backbone.conv.weight": scale * torch.randn(4, 3, 3, 3, generator=g),
        "backbone.fc.bias": scale * torch.randn(7, generator=g),
        "head.weight": scale * torch.randn(5, 7, generator=g),
    }


def test_task_arithmetic_equals_one_shot_fedavg_with_eta_k_lambda():
    theta0 = _state(0)
    clients = [{k: v + _state(10 + i, 0.1)[k] for k, v in theta0.items()} for i in range(5)]
    keys = [k for k in theta0 if is_merged_key(k)]
    taus = [task_vector(c, theta0, keys) for c in clients]
    lam = 0.3
    # Task Arithmetic as written in the paper: theta0 + lambda * sum_i tau_i.
    ta = {k: theta0[k] + lam * sum(t[k] for t in taus) for k in keys}
    fedavg = apply_update(theta0, merge("fedavg", taus), eta_for_task_arithmetic(lam, len(taus)))
    via_ta_name = apply_update(theta0, merge("task_arithmetic", taus), 5 * lam)
    for k in keys:
        torch.testing.assert_close(fedavg[k], ta[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(via_ta_name[k], ta[k], rtol=1e-6, atol=1e-6)
    # The head is not a merged parameter: apply_update copies it unchanged.
    torch.testing.assert_close(fedavg["head.weight"], theta0["head.weight"])


def test_weighted_fedavg_matches_numpy():
    taus = [{"w": torch.randn(6, 4)} for _ in range(3)]
    w = [1.0, 3.0, 6.0]
    expected = sum(wi / 10.0 * t["w"].numpy() for wi, t in zip(w, taus))
    np.testing.assert_allclose(merge("fedavg", taus, weights=w)["w"].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_apply_merge_round_trip():
    theta0 = _state(1)
    keys = [k for k in theta0 if is_merged_key(k)]
    theta1 = {k: v + 0.5 * torch.ones_like(v) for k, v in theta0.items()}
    tau = task_vector(theta1, theta0, keys)
    # Identical clients: the merged update is their common update, and eta=1 gives theta1.
    delta = merge("fedavg", [tau, tau, tau])
    back = apply_update(theta0, delta, 1.0)
    for k in keys:
        torch.testing.assert_close(back[k], theta1[k])
        torch.testing.assert_close(task_vector(back, theta0, [k])[k], delta[k])
    assert torch.equal(apply_update(theta0, delta, 0.0)["backbone.fc.bias"], theta0["backbone.fc.bias"])


def test_low_precision_base_keeps_dtype_and_update_in_float32():
    base = {"backbone.w": torch.zeros(3, dtype=torch.bfloat16)}
    ft = {"backbone.w": torch.full((3,), 1e-3, dtype=torch.bfloat16)}
    tau = task_vector(ft, base)
    assert tau["backbone.w"].dtype == torch.float32
    out = apply_update(base, tau, 2.0)
    assert out["backbone.w"].dtype == torch.bfloat16
    assert torch.allclose(out["backbone.w"].float(), torch.full((3,), 2e-3), rtol=1e-2)


def test_heads_are_kept_apart_from_merged_parameters():
    model = build_model("mnist-cnn", num_classes=3)
    merged, per_task = split_state(model.state_dict(), is_merged_key)
    assert merged and per_task
    assert all(k.startswith("backbone.") for k in merged)
    assert set(per_task) == {"head.weight", "head.bias"}
    assert per_task["head.weight"].shape == (3, 128)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda t: merge("no-such-method", t), "unknown merge method 'no-such-method'"),
        (lambda t: merge("fedavg", t, rho=0.5), "unknown parameter(s) ['rho']"),
        (lambda t: merge("fedavg", t, weights=[1.0]), "1 weights for 2 task vectors"),
        (lambda t: merge("fedavg", t, weights=[-1.0, 1.0]), "non-negative"),
        (lambda t: merge("fedavg", []), "no task vectors"),
    ],
)
def test_bad_merge_calls_raise_clear_errors(bad, message):
    taus = [{"w": torch.ones(2)}, {"w": torch.zeros(2)}]
    with pytest.raises(MergeInputError) as err:
        bad(taus)
    assert message in str(err.value)


def test_inconsistent_or_non_finite_updates_name_the_client():
    ok = {"w": torch.ones(2)}
    with pytest.raises(MergeInputError, match="node 7: update of 'w' contains NaN"):
        merge("fedavg", [ok, {"w": torch.tensor([1.0, float("nan")])}], names=["node 3", "node 7"])
    with pytest.raises(MergeInputError, match="client 1: parameter 'w' has shape"):
        merge("fedavg", [ok, {"w": torch.ones(3)}])
    with pytest.raises(MergeInputError, match="client 1 has different parameters"):
        merge("fedavg", [ok, {"v": torch.ones(2)}])
    with pytest.raises(MergeInputError, match="dtype"):
        merge("fedavg", [ok, {"w": torch.ones(2, dtype=torch.float64)}])
