"""Model Stock against its closed form on hand-built task vectors with known angles
(Jang et al. 2024: t = N cos / (1 + (N - 1) cos), merged = theta0 + t * mean tau)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fl_merge.merging.scales import eta_for_lambda
from fl_merge.methods import get_method, merge
from fl_merge.methods.model_stock import mean_pairwise_cosine, model_stock_ratio
from fl_merge.cli.schema import method_configs
from fl_merge.io.file_merge import method_scope


def _rotated(angle: float, norm: float) -> torch.Tensor:
    """A 2-D vector of length `norm` at `angle` radians from (1, 0)."""
    return torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64) * norm


def test_k2_equals_the_closed_form_per_tensor():
    # two tensors with different known angles (60 and 80 degrees) and unequal norms
    a1, a2 = math.radians(60), math.radians(80)
    tvs = [{"w": _rotated(0.0, 2.0), "b": _rotated(0.3, 1.0)},
           {"w": _rotated(a1, 0.5), "b": _rotated(0.3 + a2, 3.0)}]
    out = merge("model_stock", tvs)
    for key, angle in (("w", a1), ("b", a2)):
        c = math.cos(angle)
        t = 2 * c / (1 + c)  # paper, N = 2
        mean = (tvs[0][key] + tvs[1][key]) / 2
        torch.testing.assert_close(out[key], t * mean, rtol=1e-12, atol=1e-12)
    # cos 60 = 1/2 -> t = 2/3 exactly
    assert model_stock_ratio(0.5, 2) == pytest.approx(2 / 3)


def test_k3_at_a_common_angle_equals_the_closed_form():
    # u_i = sqrt(1 - c) e_i + sqrt(c) e_4: unit vectors with every pairwise cosine = c
    c = 0.3
    e = torch.eye(4, dtype=torch.float64)
    us = [math.sqrt(1 - c) * e[i] + math.sqrt(c) * e[3] for i in range(3)]
    tvs = [{"w": (i + 1.0) * u} for i, u in enumerate(us)]  # norms 1, 2, 3 do not matter
    out = merge("model_stock", tvs)["w"]
    t = 3 * c / (1 + 2 * c)
    torch.testing.assert_close(out, t * sum(tv["w"] for tv in tvs) / 3, rtol=1e-12, atol=1e-12)
    # the paper's merged point: t * mean(theta_i) + (1 - t) * theta0
    theta0 = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    paper = t * sum(theta0 + tv["w"] for tv in tvs) / 3 + (1 - t) * theta0
    eta = eta_for_lambda("model_stock", 1.0, 3)
    torch.testing.assert_close(theta0 + eta * out, paper, rtol=1e-12, atol=1e-12)


def test_k3_unequal_angles_use_the_mean_pairwise_cosine():
    x = [torch.tensor(v, dtype=torch.float64) for v in ([1.0, 0, 0], [1.0, 1.0, 0], [0, 1.0, 1.0])]
    # cosines by hand: (x0, x1) = 1/sqrt2, (x0, x2) = 0, (x1, x2) = 1/2
    c = (1 / math.sqrt(2) + 0.0 + 0.5) / 3
    out = merge("model_stock", [{"w": v} for v in x], weights=[1.0, 1.0, 2.0])["w"]
    t = 3 * c / (1 + 2 * c)
    torch.testing.assert_close(out, t * (x[0] + x[1] + 2 * x[2]) / 4, rtol=1e-12, atol=1e-12)


def test_edge_cases_of_the_ratio():
    assert model_stock_ratio(1.0, 5) == 1.0  # identical directions: the plain average
    assert model_stock_ratio(0.0, 5) == 0.0  # orthogonal: stay at theta0
    assert model_stock_ratio(-0.4, 2) == 0.0  # opposed: clamped, not a negative step
    g = torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # a zero vector
    assert mean_pairwise_cosine(g) == 0.0
    assert mean_pairwise_cosine(torch.tensor([[9.0]])) == 1.0


def test_opposed_and_zero_tensors_stay_at_theta0_and_one_model_is_itself():
    v = torch.tensor([1.0, 2.0, -1.0])
    out = merge("model_stock", [{"w": v, "z": torch.zeros(2)}, {"w": -v, "z": torch.zeros(2)}])
    assert torch.equal(out["w"], torch.zeros(3)) and torch.equal(out["z"], torch.zeros(2))
    torch.testing.assert_close(merge("model_stock", [{"w": v}])["w"], v)


def test_float16_and_float32_tensors_keep_their_dtype_and_match_float64():
    g = torch.Generator().manual_seed(0)
    tvs = [{"h": torch.randn(5, generator=g).half(), "f": torch.randn(7, generator=g)}
           for _ in range(3)]
    out = merge("model_stock", tvs)
    assert out["h"].dtype == torch.float16 and out["f"].dtype == torch.float32
    for k in ("h", "f"):
        # the paper's formula in numpy (float64), from the same (rounded) inputs
        x = np.stack([tv[k].double().numpy() for tv in tvs])
        cos = [x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])
               for i in range(3) for j in range(i + 1, 3)]
        c = min(max(float(np.mean(cos)), 0.0), 1.0)
        ref = 3 * c / (1 + 2 * c) * x.mean(0)
        np.testing.assert_allclose(out[k].double().numpy(), ref, rtol=2e-3, atol=2e-3)


def test_registration_scale_config_and_file_scope():
    m = get_method("model_stock")
    assert m.params == {"convention": "fl-merge"} and not m.coordinatewise
    assert eta_for_lambda("model_stock", 1.0, 4) == 1.0  # lambda = eta: paper at 1
    assert method_configs()["model_stock"] == {"name": "model_stock", "convention": "fl-merge"}
    assert method_scope("model_stock") == "exact"  # per tensor by definition


def test_the_lambda_grid_holds_the_papers_model():
    from fl_merge.merging.search import LAMBDAS, knob_grids

    assert 1.0 in LAMBDAS and knob_grids("model_stock", {}) == {}
