"""Heterogeneity metrics: known answers on constructed inputs, plus an independent numpy
reference (full concatenation) on random multi-tensor inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fl_merge.stats import heterogeneity as metrics
from fl_merge.stats.heterogeneity import (
    cosine_matrix,
    gradient_dissimilarity,
    heterogeneity_report,
    sign_agreement,
    spread,
    task_vector_norms,
    training_heterogeneity,
)
from fl_merge.core.task_vectors import MergeInputError

SHAPES = {"w": (3, 4), "b": (4,), "conv": (2, 1, 3, 3)}


def _tv(values: dict[str, list] | None = None, dtype=torch.float32, fill=0.0):
    """A task vector with SHAPES, zeros (or `fill`) except the given flat values per key."""
    out = {}
    for k, s in SHAPES.items():
        t = torch.full(s, fill, dtype=dtype)
        if values and k in values:
            t = torch.tensor(values[k], dtype=dtype).reshape(s)
        out[k] = t
    return out


def _one_hot(key: str, idx: int, value: float = 1.0, dtype=torch.float32):
    tv = _tv(dtype=dtype)
    tv[key].view(-1)[idx] = value
    return tv


def _random_tvs(k: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=gen, dtype=dtype) for n, s in SHAPES.items()}
            for _ in range(k)]


def _flat_np(tv) -> np.ndarray:
    # reference: concatenation in dict order of the first task vector
    return np.concatenate([tv[k].double().numpy().reshape(-1) for k in SHAPES])


# ----------------------------------------------------------------------------- known answers


def test_norms_known_values():
    a = _tv()
    a["w"].view(-1)[0] = 3.0
    a["conv"].view(-1)[5] = 4.0  # ||a|| = 5 across two tensors
    b = _one_hot("b", 2, -2.0)
    assert task_vector_norms([a, b]) == pytest.approx([5.0, 2.0], abs=1e-12)


def test_identical_clients():
    base = _random_tvs(1, seed=0)[0]
    tvs = [{k: v.clone() for k, v in base.items()} for _ in range(3)]
    c = cosine_matrix(tvs)
    assert c.dtype == torch.float64 and c.shape == (3, 3)
    assert torch.allclose(c, torch.ones(3, 3, dtype=torch.float64), atol=1e-12)

    d = gradient_dissimilarity(tvs)
    assert d["grad_diversity"] == pytest.approx(0.0, abs=1e-10)
    assert d["b_dissimilarity"] == pytest.approx(1.0, abs=1e-12)
    assert d["mean_grad_norm"] == pytest.approx(task_vector_norms(tvs)[0], rel=1e-12)

    s = sign_agreement(tvs, rho=0.5)  # randn: no exact zeros
    assert s == {"sign_agreement": pytest.approx(1.0, abs=1e-12),
                 "unanimous_fraction": 1.0, "above_rho_fraction": 1.0}


def test_orthogonal_disjoint_supports():
    tvs = [_one_hot("w", 0, 2.0), _one_hot("w", 5, -1.0), _one_hot("conv", 17, 0.5)]
    c = cosine_matrix(tvs)
    assert torch.equal(c, torch.eye(3, dtype=torch.float64))

    # a partial overlap has a known cosine: a = e1 + e2, b = e2  ->  1/sqrt(2)
    a = _one_hot("w", 0)
    a["b"].view(-1)[1] = 1.0
    b = _one_hot("b", 1, 7.0)
    assert float(cosine_matrix([a, b])[0, 1]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_opposite_updates():
    a = _random_tvs(1, seed=1)[0]
    b = {k: -v for k, v in a.items()}
    c = cosine_matrix([a, b])
    assert float(c[0, 1]) == pytest.approx(-1.0, abs=1e-12)
    assert float(c[1, 0]) == pytest.approx(-1.0, abs=1e-12)
    s = sign_agreement([a, b], rho=0.5)
    assert s["sign_agreement"] == 0.0
    assert s["unanimous_fraction"] == 0.0
    assert s["above_rho_fraction"] == 0.0
    # with weights 3:1 the agreement is |0.75 - 0.25| = 0.5 everywhere
    s = sign_agreement([a, b], weights=[3, 1], rho=0.5)
    assert s["sign_agreement"] == pytest.approx(0.5, abs=1e-12)
    assert s["unanimous_fraction"] == 0.0
    assert s["above_rho_fraction"] == 1.0
    assert sign_agreement([a, b], weights=[3, 1], rho=0.6)["above_rho_fraction"] == 0.0


def test_zero_vector_cosine_convention():
    z = _tv()
    a = _one_hot("b", 0)
    c = cosine_matrix([z, a, z])
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    assert torch.equal(c, expected)


def test_sign_agreement_known_counts():
    n = sum(math.prod(s) for s in SHAPES.values())  # 12 + 4 + 18 = 34
    # three clients, coordinate-wise: coord w0: +,+,+ ; coord w1: +,+,- ; coord b0: +,0,+ ;
    # everything else zero for all clients (a = 0)
    tvs = [_tv(), _tv(), _tv()]
    for i, (w0, w1, b0) in enumerate([(1, 2, 1), (5, 1, 0), (0.1, -3, 2)]):
        tvs[i]["w"].view(-1)[0] = w0
        tvs[i]["w"].view(-1)[1] = w1
        tvs[i]["b"].view(-1)[0] = b0
    s = sign_agreement(tvs, rho=0.5)
    # a = 1, 1/3, 2/3 on the three coordinates
    assert s["sign_agreement"] == pytest.approx((1 + 1 / 3 + 2 / 3) / n, abs=1e-12)
    assert s["unanimous_fraction"] == pytest.approx(1 / n)
    assert s["above_rho_fraction"] == pytest.approx(2 / n)
    assert "above_rho_fraction" not in sign_agreement(tvs)
    # a zero-weight client does not count: p = (1/2, 1/2, 0) -> a = 1, 1, 1/2
    s = sign_agreement(tvs, weights=[1, 1, 0])
    assert s["unanimous_fraction"] == pytest.approx(2 / n)  # w0 and w1
    assert s["sign_agreement"] == pytest.approx((1 + 1 + 0.5) / n, abs=1e-12)


def test_gradient_dissimilarity_known_values():
    # g1 = (1, 0), g2 = (0, 1) in different tensors, uniform: g = (0.5, 0.5)
    g1, g2 = _one_hot("w", 0), _one_hot("conv", 3)
    d = gradient_dissimilarity([g1, g2])
    assert d["mean_grad_norm"] == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert d["grad_diversity"] == pytest.approx(0.5, abs=1e-12)   # each ||g_i - g||^2 = 0.5
    assert d["b_dissimilarity"] == pytest.approx(2.0, abs=1e-12)  # 1 / 0.5

    # weights 3:1: g = (0.75, 0.25), ||g||^2 = 0.625, sum p||g_i||^2 = 1, G^2 = 0.375
    d = gradient_dissimilarity([g1, g2], weights=[3.0, 1.0])
    assert d["mean_grad_norm"] ** 2 == pytest.approx(0.625, abs=1e-12)
    assert d["grad_diversity"] == pytest.approx(0.375, abs=1e-12)
    assert d["b_dissimilarity"] == pytest.approx(1 / 0.625, abs=1e-12)

    # opposite gradients: g = 0 -> B^2 = inf; G^2 = ||g_i||^2 = 1
    d = gradient_dissimilarity([g1, {k: -v for k, v in g1.items()}])
    assert d["mean_grad_norm"] == 0.0
    assert d["b_dissimilarity"] == math.inf
    assert d["grad_diversity"] == pytest.approx(1.0, abs=1e-12)


def test_gradient_identity_with_weights():
    grads = _random_tvs(4, seed=3)
    w = [0.1, 2.0, 0.7, 1.2]
    p = np.asarray(w) / sum(w)
    d = gradient_dissimilarity(grads, weights=w)
    mean_sq = sum(pi * float(np.sum(_flat_np(g) ** 2)) for pi, g in zip(p, grads))
    g_sq = d["mean_grad_norm"] ** 2
    assert mean_sq == pytest.approx(g_sq + d["grad_diversity"], rel=1e-12)
    assert d["b_dissimilarity"] == pytest.approx(1 + d["grad_diversity"] / g_sq, rel=1e-12)
    assert d["b_dissimilarity"] > 1.0


def test_spread():
    assert spread([1, 1, 1]) == 0.0
    assert spread([7.5]) == 0.0
    assert spread([0, 0]) == 0.0
    assert spread([1, 3]) == pytest.approx(0.5, abs=1e-15)          # std 1, mean 2
    assert spread([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(2 / 5)  # std 2, mean 5
    assert spread(np.array([10.0, 20.0])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="empty"):
        spread([])
    with pytest.raises(ValueError, match="mean 0"):
        spread([-1, 1])
    with pytest.raises(ValueError, match="non-finite"):
        spread([1.0, float("nan")])


def test_training_heterogeneity():
    out = training_heterogeneity([100, 100], [0.1, 0.2])
    assert out["steps_cv"] == 0.0
    assert out["lr_steps_cv"] == pytest.approx(1 / 3, abs=1e-12)
    out = training_heterogeneity([50, 150], 0.1)
    assert out["steps_cv"] == pytest.approx(0.5)
    assert out["lr_steps_cv"] == pytest.approx(0.5)
    assert training_heterogeneity([10, 30]) == {"steps_cv": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="learning rates"):
        training_heterogeneity([10, 30], [0.1])
    with pytest.raises(ValueError):
        training_heterogeneity([])


# ----------------------------------------------------------------------------- numpy reference


@pytest.mark.parametrize("chunk", [metrics._CHUNK, 5])  # 5: tensors split across blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_numpy_reference(monkeypatch, chunk, dtype):
    monkeypatch.setattr(metrics, "_CHUNK", chunk)
    k = 5
    tvs = _random_tvs(k, seed=11, dtype=dtype)
    # sprinkle exact zeros and reorder one dict's keys (order of tvs[0] defines the vector)
    tvs[2]["b"][1] = 0.0
    tvs[4]["w"][0, :2] = 0.0
    tvs[3] = dict(reversed(list(tvs[3].items())))
    w = np.array([1.0, 0.5, 2.0, 0.0, 3.0])
    p = w / w.sum()
    X = np.stack([_flat_np(tv) for tv in tvs])  # [K, n]

    norms = np.linalg.norm(X, axis=1)
    assert task_vector_norms(tvs) == pytest.approx(norms.tolist(), rel=1e-12)

    cos = (X @ X.T) / np.outer(norms, norms)
    np.fill_diagonal(cos, 1.0)
    assert np.allclose(cosine_matrix(tvs).numpy(), cos, atol=1e-12)

    g = p @ X
    div = float(np.sum(p * np.sum((X - g) ** 2, axis=1)))
    b2 = float(np.sum(p * np.sum(X ** 2, axis=1)) / np.sum(g ** 2))
    d = gradient_dissimilarity(tvs, weights=w)
    assert d["grad_diversity"] == pytest.approx(div, rel=1e-10)
    assert d["b_dissimilarity"] == pytest.approx(b2, rel=1e-10)
    assert d["mean_grad_norm"] == pytest.approx(float(np.linalg.norm(g)), rel=1e-10)

    a = np.abs(p @ np.sign(X))
    s = sign_agreement(tvs, weights=w, rho=0.4)
    assert s["sign_agreement"] == pytest.approx(float(a.mean()), rel=1e-12)
    assert s["unanimous_fraction"] == pytest.approx(float(np.mean(a >= 1 - 1e-12)))
    assert s["above_rho_fraction"] == pytest.approx(float(np.mean(a >= 0.4 - 1e-12)))
    assert 0 < s["unanimous_fraction"] < s["above_rho_fraction"] < 1

    r = heterogeneity_report(tvs, weights=w, rho=0.4)
    off = cos[~np.eye(k, dtype=bool)]
    assert r["mean_cosine"] == pytest.approx(float(off.mean()), abs=1e-12)
    assert r["min_cosine"] == pytest.approx(float(off.min()), abs=1e-12)
    assert r["norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-12)
    assert r["norm_cv"] == pytest.approx(float(norms.std() / norms.mean()), rel=1e-10)
    assert r["sign_agreement"] == pytest.approx(s["sign_agreement"], rel=1e-12)


# ----------------------------------------------------------------------------- report


def test_heterogeneity_report_full_and_json():
    tvs = _random_tvs(3, seed=5)
    grads = _random_tvs(3, seed=6)
    r = heterogeneity_report(tvs, weights=[1, 2, 3], grads=grads, local_steps=[100, 100, 400],
                             lrs=[0.1, 0.2, 0.1], rho=0.5)
    expected = {
        "num_clients", "norms", "norm_mean", "norm_cv", "cosine_matrix", "mean_cosine",
        "min_cosine", "sign_agreement", "unanimous_fraction", "above_rho_fraction",
        "grad_diversity", "b_dissimilarity", "mean_grad_norm", "steps_cv", "lr_steps_cv",
    }
    assert set(r) == expected
    back = json.loads(json.dumps(r, allow_nan=False))
    assert back == r
    assert r["num_clients"] == 3
    assert len(r["cosine_matrix"]) == 3 and all(len(row) == 3 for row in r["cosine_matrix"])
    assert r["norms"] == pytest.approx(task_vector_norms(tvs), rel=1e-12)
    assert r["grad_diversity"] == pytest.approx(
        gradient_dissimilarity(grads, [1, 2, 3])["grad_diversity"], rel=1e-12)
    # steps 100,100,400: mean 200, std sqrt(20000) -> cv = sqrt(2)/2
    assert r["steps_cv"] == pytest.approx(math.sqrt(2) / 2, rel=1e-12)
    # lr*steps = 10, 20, 40: mean 70/3
    vals = np.array([10.0, 20.0, 40.0])
    assert r["lr_steps_cv"] == pytest.approx(float(vals.std() / vals.mean()), rel=1e-12)
    for key in expected - {"norms", "cosine_matrix", "num_clients"}:
        assert type(r[key]) is float, key


def test_heterogeneity_report_minimal_and_identical():
    base = _random_tvs(1, seed=8)[0]
    tvs = [{k: v.clone() for k, v in base.items()} for _ in range(2)]
    r = heterogeneity_report(tvs, rho=None)
    assert set(r) == {"num_clients", "norms", "norm_mean", "norm_cv", "cosine_matrix",
                      "mean_cosine", "min_cosine", "sign_agreement", "unanimous_fraction"}
    assert r["norm_cv"] == 0.0
    assert r["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert r["min_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert r["sign_agreement"] == pytest.approx(1.0, abs=1e-12)
    assert r["unanimous_fraction"] == 1.0
    json.dumps(r)


def test_heterogeneity_report_single_client():
    tv = _random_tvs(1, seed=9)
    r = heterogeneity_report(tv, grads=tv, local_steps=[10], lrs=[0.1])
    assert r["num_clients"] == 1
    assert r["cosine_matrix"] == [[1.0]]
    assert math.isnan(r["mean_cosine"]) and math.isnan(r["min_cosine"])
    assert r["norm_cv"] == 0.0 and r["steps_cv"] == 0.0 and r["lr_steps_cv"] == 0.0
    assert r["sign_agreement"] == pytest.approx(1.0, abs=1e-12)
    assert r["grad_diversity"] == 0.0 and r["b_dissimilarity"] == pytest.approx(1.0)
    json.dumps(r)  # NaN is written as NaN


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
    a, b = _random_tvs(2, seed=10)
    fns = [task_vector_norms, cosine_matrix, gradient_dissimilarity, sign_agreement,
           heterogeneity_report]
    for fn in fns:
        with pytest.raises(ValueError, match="no "):
            fn([])
        with pytest.raises(ValueError, match="different parameters"):
            fn([a, {k: v for k, v in b.items() if k != "b"}])
        with pytest.raises(ValueError, match="shape"):
            fn([a, {**b, "w": torch.zeros(4, 3)}])
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn([a, {**b, "b": torch.full((4,), float("nan"))}])
    empty = {"w": torch.zeros(0)}
    with pytest.raises(ValueError, match="no coordinates"):
        task_vector_norms([empty, empty])
    with pytest.raises(MergeInputError, match="weights"):
        gradient_dissimilarity([a, b], weights=[1.0])
    with pytest.raises(MergeInputError, match="weights"):
        sign_agreement([a, b], weights=[1.0, -1.0])
    with pytest.raises(MergeInputError, match="rho"):
        sign_agreement([a, b], rho=1.5)
    with pytest.raises(MergeInputError, match="gradients for 2"):
        heterogeneity_report([a, b], grads=[a])
    with pytest.raises(MergeInputError, match="local step counts for 2"):
        heterogeneity_report([a, b], local_steps=[1, 2, 3])
    with pytest.raises(MergeInputError, match="lrs given without"):
        heterogeneity_report([a, b], lrs=[0.1, 0.1])


def test_gain_recovered_by_hand():
    # README demo on main (base 0.761, individual 0.953, TA 0.825): 0.064 / 0.192 = 1/3
    assert metrics.gain_recovered(0.761, 0.953, 0.825) == pytest.approx(1 / 3)
    # per-task lists are averaged first: base mean 0.5, individual 0.9, merged 0.7 -> 0.2/0.4
    assert metrics.gain_recovered([0.4, 0.6], [0.9, 0.9], [0.5, 0.9]) == pytest.approx(0.5)
    assert metrics.gain_recovered(0.5, 0.9, 0.9) == pytest.approx(1.0)
    assert metrics.gain_recovered(0.5, 0.9, 0.4) == pytest.approx(-0.25)  # worse than the base


@pytest.mark.parametrize("args, message", [
    ((0.8, 0.8, 0.8), r"needs fine-tuning to gain over the base: individual 0.8 <= base 0.8"),
    (([0.5, 0.6], [0.9], [0.7]), r"same non-empty number of tasks .*\[2, 1, 1\]"),
    (([], [], []), r"same non-empty number of tasks"),
    ((0.5, float("nan"), 0.7), r"non-finite"),
])
def test_gain_recovered_refuses_meaningless_input(args, message):
    with pytest.raises(ValueError, match=message):
        metrics.gain_recovered(*args)
