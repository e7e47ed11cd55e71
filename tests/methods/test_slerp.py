"""SLERP (mergekit 0.1.5's slerp) against the textbook formula written out in numpy on the
models theta_i = theta0 + tau_i, per tensor; its linear fallback, its K = 2 refusal, the
theta0 it needs (merge's `theta0`), and `fl-merge merge`'s per-tensor run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.io.file_merge import merge_tensor
from fl_merge.merging.registry import check_method_params, get_method, is_per_tensor_exact
from fl_merge.merging.scales import eta_for_lambda
from fl_merge.methods import merge
from methods.helpers import SHAPES, assert_close, assert_refused, make_tvs


def ref_slerp(a, b, t):
    """Shoemake's slerp of two vectors, each normalised by its length for the angle; nearly
    parallel or antiparallel (|cos| > 0.9995): the straight line."""
    la = math.sqrt(sum(v * v for v in a)) or 1.0
    lb = math.sqrt(sum(v * v for v in b)) or 1.0
    cos = max(-1.0, min(1.0, sum(x * y for x, y in zip(a, b)) / (la * lb)))
    if abs(cos) > 0.9995:
        return np.array([(1 - t) * x + t * y for x, y in zip(a, b)])
    om = math.acos(cos)
    return np.array([(math.sin((1 - t) * om) * x + math.sin(t * om) * y) / math.sin(om)
                     for x, y in zip(a, b)])


def ref_delta(theta0, tvs, t):
    out = []
    for key in SHAPES:
        base = theta0[key].double().numpy().reshape(-1)
        a = base + tvs[0][key].double().numpy().reshape(-1)
        b = base + tvs[1][key].double().numpy().reshape(-1)
        out.append(ref_slerp(list(a), list(b), t) - base)
    return np.concatenate(out)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("w", [None, [1.0, 3.0]])  # mergekit's slerp has no weights
def test_slerp_is_the_spherical_interpolation_of_the_models(t, w):
    theta0 = make_tvs(1, 50, scale=2.0)[0]
    tvs = make_tvs(2, 51)
    out = merge("slerp", tvs, w, theta0=theta0, t=t)
    assert_close(out, ref_delta(theta0, tvs, t), rtol=1e-5, atol=2e-6)


def test_ends_are_the_models_and_eta_one_is_the_model():
    theta0, tvs = make_tvs(1, 52)[0], make_tvs(2, 53)
    for t, i in ((0.0, 0), (1.0, 1)):
        out = merge("slerp", tvs, theta0=theta0, t=t)
        for k in SHAPES:
            torch.testing.assert_close(out[k], tvs[i][k], rtol=1e-5, atol=1e-6)
    # theta0 + 1 * Delta is the slerp of the models (not of the task vectors)
    out = merge("slerp", tvs, theta0=theta0, t=0.3)
    a, b = theta0["fc.weight"] + tvs[0]["fc.weight"], theta0["fc.weight"] + tvs[1]["fc.weight"]
    got = (theta0["fc.weight"] + out["fc.weight"]).double().numpy().ravel()
    np.testing.assert_allclose(got, ref_slerp(list(a.double().numpy().ravel()),
                                              list(b.double().numpy().ravel()), 0.3), rtol=1e-5)
    on_taus = merge("slerp", tvs, theta0={k: torch.zeros_like(v) for k, v in theta0.items()}, t=0.3)
    assert not torch.allclose(on_taus["fc.weight"], out["fc.weight"], atol=1e-3)


def test_norm_and_angle_by_hand():
    # a = (1, 0), b = (0, 2) from theta0 = 0: angle pi/2, t = 1/2: sin(pi/4)/1 * (a + b)
    out = merge("slerp", [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}],
                theta0={"w": torch.zeros(2)})["w"]
    assert out.tolist() == pytest.approx([math.sqrt(0.5), 2 * math.sqrt(0.5)], rel=1e-6)
    # the base shifts the models: theta0 = (0, 0) + 5 makes them nearly parallel: linear
    base = {"w": torch.tensor([500.0, 500.0])}
    out = merge("slerp", [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}],
                theta0=base, t=0.25)["w"]
    assert out.tolist() == pytest.approx([0.75, 0.5], rel=1e-5)


def test_colinear_and_antipodal_models_are_interpolated_linearly():
    a = torch.tensor([1.0, 2.0, 3.0])
    for b in (3.0 * a, -2.0 * a):
        out = merge("slerp", [{"w": a}, {"w": b}], theta0={"w": torch.zeros(3)}, t=0.3)["w"]
        torch.testing.assert_close(out, 0.7 * a + 0.3 * b)
    # a zero model: its norm counts as 1, cos 0: slerp toward 0 by sin((1 - t) pi/2)
    out = merge("slerp", [{"w": a}, {"w": torch.zeros(3)}], theta0={"w": torch.zeros(3)}, t=0.5)
    torch.testing.assert_close(out["w"], math.sin(math.pi / 4) * a)


def test_per_tensor_exact_and_the_file_merge_passes_theta0():
    theta0, tvs = make_tvs(1, 54)[0], make_tvs(2, 55)
    whole = merge("slerp", tvs, theta0=theta0, t=0.7)
    assert is_per_tensor_exact("slerp")
    for key in SHAPES:
        thetas = [theta0[key] + tv[key] for tv in tvs]
        got = merge_tensor("slerp", key, theta0[key], thetas, 1.0, torch.float32, {"t": 0.7})
        torch.testing.assert_close(got, theta0[key] + whole[key])


def test_declarations():
    m = get_method("slerp")
    assert m.params == {"t": 0.5} and m.space == {"t": (0.25, 0.5, 0.75)}
    assert m.needs.theta0 and m.takes_theta0 and not m.coordinatewise
    assert eta_for_lambda("slerp", 1.0, 2) == 1.0


@pytest.mark.parametrize("k", [1, 3, 7])
def test_other_client_counts_are_refused_before_training(k):
    with pytest.raises(MergeInputError, match=f"slerp interpolates exactly two models, got {k}"):
        check_method_params("slerp", {}, k)
    with pytest.raises(MergeInputError, match=f"merge method 'slerp' with {k} clients"):
        merge("slerp", make_tvs(k, 1), theta0=make_tvs(1, 2)[0])


def test_theta0_is_required_and_checked():
    tvs = make_tvs(2, 3)
    with pytest.raises(MergeInputError, match=r"'slerp' is defined on the models theta0 \+ tau_i: "
                                              r"pass the base model"):
        merge("slerp", tvs)
    bad = dict(make_tvs(1, 4)[0])
    del bad["scale"]
    with pytest.raises(MergeInputError, match=r"theta0's keys differ .*'scale'"):
        merge("slerp", tvs, theta0=bad)
    with pytest.raises(MergeInputError, match=r"theta0\['scale'\] has shape \(2,\)"):
        merge("slerp", tvs, theta0={**bad, "scale": torch.zeros(2)})
    with pytest.raises(MergeInputError, match=r"theta0\['scale'\] contains NaN"):
        merge("slerp", tvs, theta0={**bad, "scale": torch.tensor(float("nan"))})
    with pytest.raises(MergeInputError, match="theta0 must be a dict of tensors"):
        merge("slerp", tvs, theta0=[1.0])


@pytest.mark.parametrize("kw,match", [
    ({"t": -0.1}, r"t must lie in \[0, 1\]"),
    ({"t": 1.5}, r"t must lie in \[0, 1\]"),
    ({"t": "half"}, r"t must be a finite number"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("slerp", kw, match, k=2, theta0={"w": torch.zeros(3, 2), "b": torch.zeros(2)})
