"""Karcher mean (mergekit 0.1.5's karcher) against a numpy Riemannian gradient descent on the
sphere written out here (log and exp maps), against its defining property (the weighted
log maps sum to zero), and against the geodesic midpoint of two models; per tensor, on the
models theta_i = theta0 + tau_i."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.io.file_merge import merge_tensor
from fl_merge.merging.registry import get_method, is_per_tensor_exact
from fl_merge.merging.scales import eta_for_lambda
from fl_merge.methods import merge
from methods.helpers import SHAPES, WEIGHTS, assert_close, assert_refused, make_tvs, norm_p


def log_map(m, u, tol):
    """Tangent at m pointing to u along the great circle, of length the angle."""
    c = min(1.0, max(-1.0, float(np.dot(m, u))))
    ang = math.acos(c)
    return None if ang < tol else ang / math.sin(ang) * (u - c * m)


def ref_karcher(xs, alphas, max_iter=10, tol=1e-5):
    if len(xs) == 1:
        return xs[0]
    norms = [float(np.linalg.norm(x)) for x in xs]
    live = [i for i in range(len(xs)) if norms[i] > tol]
    if not live:
        return np.zeros_like(xs[0])
    a = {i: alphas[i] / sum(alphas[j] for j in live) for i in live}
    units = {i: xs[i] / norms[i] for i in live}
    m = sum(a[i] * units[i] for i in live)
    m = units[live[0]] if np.linalg.norm(m) < tol else m / np.linalg.norm(m)
    for _ in range(max_iter):
        steps = [log_map(m, units[i], tol) for i in live]
        v = sum((a[i] * s for i, s in zip(live, steps) if s is not None), np.zeros_like(m))
        nv = float(np.linalg.norm(v))
        if nv < tol:
            break
        m = math.cos(nv) * m + math.sin(nv) * v / nv  # exp map
        if np.linalg.norm(m) > tol:
            m = m / np.linalg.norm(m)
    return sum(alphas[i] * norms[i] for i in range(len(xs))) * m


def ref_delta(theta0, tvs, p, **kw):
    out = []
    for key in SHAPES:
        base = theta0[key].double().numpy().reshape(-1)
        xs = [base + tv[key].double().numpy().reshape(-1) for tv in tvs]
        out.append(ref_karcher(xs, list(p), **kw) - base)
    return np.concatenate(out)


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("kw", [{}, {"max_iter": 0}, {"max_iter": 1}, {"max_iter": 50, "tol": 1e-7}])
def test_karcher_is_the_riemannian_mean_of_the_models(w, k, kw):
    theta0 = make_tvs(1, 60, scale=0.5)[0]
    tvs = make_tvs(k, 61)
    p = norm_p(w[:k] if w else None, k)
    out = merge("karcher", tvs, w[:k] if w else None, theta0=theta0, **kw)
    assert_close(out, ref_delta(theta0, tvs, p, **kw), rtol=1e-4, atol=1e-5)


def test_converged_mean_zeroes_the_weighted_log_maps_and_keeps_the_mean_norm():
    theta0, tvs = make_tvs(1, 62)[0], make_tvs(4, 63)
    p = norm_p(WEIGHTS[1][:4], 4)
    out = merge("karcher", tvs, WEIGHTS[1][:4], theta0=theta0, max_iter=200, tol=1e-9)
    for key in ("conv.weight", "fc.weight"):
        base = theta0[key].double().numpy().ravel()
        xs = [base + tv[key].double().numpy().ravel() for tv in tvs]
        merged = base + out[key].double().numpy().ravel()
        m = merged / np.linalg.norm(merged)
        grad = sum(pi * log_map(m, x / np.linalg.norm(x), 0.0) for pi, x in zip(p, xs))
        assert np.linalg.norm(grad) < 1e-4
        assert np.linalg.norm(merged) == pytest.approx(sum(pi * np.linalg.norm(x)
                                                           for pi, x in zip(p, xs)), rel=1e-5)


def test_two_models_meet_at_the_geodesic_midpoint():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    out = merge("karcher", [{"w": a}, {"w": b}], theta0={"w": torch.zeros(3)}, max_iter=100)["w"]
    # directions (1,0,0), (0,1,0): midpoint (1,1,0)/sqrt2; norm the mean of 3 and 1
    torch.testing.assert_close(out, 2.0 * torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2.0))


def test_one_model_is_itself_and_identical_models_are_themselves():
    theta0 = make_tvs(1, 64)[0]
    one = make_tvs(1, 65)
    assert_close(merge("karcher", one, theta0=theta0), np.concatenate(
        [one[0][k].double().numpy().ravel() for k in SHAPES]), rtol=1e-6, atol=1e-6)
    same = [one[0]] * 3
    out = merge("karcher", same, theta0=theta0)
    for k in SHAPES:
        torch.testing.assert_close(out[k], one[0][k], rtol=1e-5, atol=1e-5)


def test_zero_models_are_left_out_of_the_direction_but_not_the_norm():
    a = torch.tensor([2.0, 0.0])
    out = merge("karcher", [{"w": a}, {"w": torch.zeros(2)}], theta0={"w": torch.zeros(2)})["w"]
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]))  # (2 + 0) / 2 along a
    out = merge("karcher", [{"w": torch.zeros(2)}] * 2, theta0={"w": torch.zeros(2)})["w"]
    assert out.tolist() == [0.0, 0.0]
    # a zero-weight model takes no part; when it is the only nonzero one, the result is 0
    out = merge("karcher", [{"w": a}, {"w": torch.zeros(2)}], [0.0, 1.0],
                theta0={"w": torch.zeros(2)})["w"]
    assert out.tolist() == [0.0, 0.0]


def test_per_tensor_exact_and_the_file_merge_passes_theta0():
    theta0, tvs = make_tvs(1, 66)[0], make_tvs(3, 67)
    whole = merge("karcher", tvs, theta0=theta0)
    assert is_per_tensor_exact("karcher")
    for key in SHAPES:
        got = merge_tensor("karcher", key, theta0[key], [theta0[key] + tv[key] for tv in tvs],
                           1.0, torch.float32, {})
        torch.testing.assert_close(got, theta0[key] + whole[key])


def test_declarations():
    m = get_method("karcher")
    assert m.params == {"max_iter": 10, "tol": 1e-5} and m.space == {}
    assert m.needs.theta0 and not m.coordinatewise
    assert eta_for_lambda("karcher", 1.0, 5) == 1.0
    with pytest.raises(MergeInputError, match="'karcher' is defined on the models"):
        merge("karcher", make_tvs(3, 1))


@pytest.mark.parametrize("kw,match", [
    ({"max_iter": -1}, r"max_iter must be an integer in \[0, 10000\], got -1"),
    ({"max_iter": 2.5}, r"max_iter must be an integer"),
    ({"max_iter": 10**6}, r"max_iter must be an integer in \[0, 10000\]"),
    ({"tol": -1e-3}, r"tol must be >= 0"),
    ({"tol": "small"}, r"tol must be a finite number"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("karcher", kw, match, theta0={"w": torch.zeros(3, 2), "b": torch.zeros(2)})
