"""WUDI-Merging (Cheng et al., ICML 2025) against numpy: the paper's loss
sum_i ||(x - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 differentiated by hand (checked against
finite differences), Adam written out step by step, and the loss's closed-form minimiser
from its normal equations x A = B."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.cli.schema import method_configs
from fl_merge.io.file_merge import method_scope
from fl_merge.merging.scales import eta_for_lambda, lambda_scale
from fl_merge.merging.search import knob_grids
from fl_merge.methods import get_method, merge
from methods.helpers import assert_refused, norm_p

# gram: n <= K m (A, B accumulated); stack: n > K m (the authors' stacked form), at K = 3
MATRICES = {"gram": (6, 4), "stack": (2, 9)}


def _taus(k, shape, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) * scale for _ in range(k)]


def ref_loss(x, taus, c):
    return sum(ci * np.sum(((x - t) @ t.T) ** 2) / np.sum(t * t) for ci, t in zip(c, taus))


def ref_grad(x, taus, c):
    """d/dx of ref_loss: 2 sum_i c_i (x - tau_i) tau_i^T tau_i / ||tau_i||^2."""
    return sum(2 * ci * (x - t) @ t.T @ t / np.sum(t * t) for ci, t in zip(c, taus))


def ref_adam(x0, taus, c, steps, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Kingma & Ba's Adam as torch.optim.Adam computes it (eps after the bias-corrected root)."""
    x, m, v = x0.copy(), np.zeros_like(x0), np.zeros_like(x0)
    for t in range(1, steps + 1):
        g = ref_grad(x, taus, c)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return x


def _coef(w, k):
    p = norm_p(w, k)
    return k * p  # c_i = K p_i: 1 for uniform weights, the authors' loss


def _merge(taus, **kw):
    return merge("wudi", [{"w": torch.tensor(t)} for t in taus], **kw)["w"].numpy()


def test_hand_gradient_is_the_loss_derivative():
    taus = _taus(3, (4, 5), seed=1)
    c = np.array([1.0, 0.5, 2.0])
    x = np.random.default_rng(2).normal(size=(4, 5))
    h, num = 1e-6, np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        num[idx] = (ref_loss(x + e, taus, c) - ref_loss(x - e, taus, c)) / (2 * h)
    np.testing.assert_allclose(ref_grad(x, taus, c), num, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form", list(MATRICES))
@pytest.mark.parametrize("w", [None, [1.0, 3.0, 0.5]])
def test_n_steps_are_numpys_adam_trajectory(form, w):
    taus = _taus(3, MATRICES[form], seed=3)
    c = _coef(w, 3)
    x0 = sum(ci * t for ci, t in zip(c, taus))
    for steps, lr in [(0, 0.1), (1, 0.1), (7, 0.05), (40, 0.01)]:
        out = _merge(taus, weights=w, iters=steps, lr=lr)
        np.testing.assert_allclose(out, ref_adam(x0, taus, c, steps, lr), rtol=1e-9, atol=1e-10)


def test_the_authors_defaults_on_task_vector_sized_entries():
    # fine-tuned weights move by ~1e-3: 300 steps of lr 1e-5 then change tau_m visibly
    taus = _taus(4, (8, 6), seed=4, scale=1e-3)
    x0 = sum(taus)
    out = _merge(taus)
    ref = ref_adam(x0, taus, np.ones(4), 300, 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12)
    assert np.abs(out - x0).max() > 1e-3  # it moved, by up to 300 * lr per entry
    assert np.abs(out - x0).max() <= 300 * 1e-5 * 1.01
    assert ref_loss(out, taus, np.ones(4)) < ref_loss(x0, taus, np.ones(4))


@pytest.mark.parametrize("w", [None, [2.0, 1.0, 1.0]])
def test_many_steps_reach_the_normal_equations_minimiser(w):
    # full-rank A (K m >= n): the unique minimiser solves x A = B
    taus = _taus(3, MATRICES["gram"], seed=5)
    c = _coef(w, 3)
    a = sum(ci * t.T @ t / np.sum(t * t) for ci, t in zip(c, taus))
    b = sum(ci * t @ t.T @ t / np.sum(t * t) for ci, t in zip(c, taus))
    closed = np.linalg.solve(a.T, b.T).T
    out = _merge(taus, weights=w, iters=5000, lr=1e-2)
    np.testing.assert_allclose(out, closed, rtol=1e-8, atol=1e-8)


def test_rank_deficient_loss_reaches_its_minimum():
    # n > K m: the minimisers form an affine set (Adam lands on one of them, not the
    # projection of the start); the loss reaches its minimum, 0 here, and the gradient 0
    taus = _taus(3, MATRICES["stack"], seed=6)
    out = _merge(taus, iters=5000, lr=1e-2)
    assert ref_loss(out, taus, np.ones(3)) < 1e-20 < ref_loss(sum(taus), taus, np.ones(3))
    np.testing.assert_allclose(ref_grad(out, taus, np.ones(3)), 0.0, atol=1e-9)


def test_non_matrix_tensors_base_or_mean_and_one_client():
    rng = np.random.default_rng(7)
    shapes = {"w": (5, 3), "b": (3,), "conv": (2, 2, 3), "s": ()}
    tvs = [{n: torch.tensor(rng.normal(size=s)) for n, s in shapes.items()} for _ in range(3)]
    w = [1.0, 2.0, 1.0]
    p = norm_p(w, 3)
    base = merge("wudi", tvs, weights=w)
    mean = merge("wudi", tvs, weights=w, others="mean")
    for n in ("b", "conv", "s"):
        assert torch.equal(base[n], torch.zeros_like(tvs[0][n]))  # the authors': the base
        np.testing.assert_allclose(mean[n].numpy(), sum(pi * tv[n].numpy() for pi, tv in zip(p, tvs)),
                                   rtol=1e-12)
    assert torch.equal(base["w"], mean["w"])
    # K = 1: the start tau_1 is the minimum (gradient 0), so every matrix is tau_1 exactly
    one = merge("wudi", tvs[:1], iters=50, lr=0.1)
    assert torch.equal(one["w"], tvs[0]["w"]) and torch.equal(one["b"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(merge("wudi", tvs[:1], others="mean")["b"], tvs[0]["b"])


def test_zero_weight_and_zero_clients_are_absent():
    taus = _taus(3, (4, 3), seed=8)
    ref = _merge(taus[:2], iters=20, lr=0.05)
    np.testing.assert_allclose(_merge(taus, weights=[1.0, 1.0, 0.0], iters=20, lr=0.05), ref,
                               rtol=1e-12)
    # an all-zero task vector adds nothing to the loss (the authors' code divides 0 by 0)
    np.testing.assert_allclose(_merge(taus[:2] + [np.zeros((4, 3))], iters=20, lr=0.05), ref,
                               rtol=1e-12)
    assert not np.any(_merge([np.zeros((4, 3))] * 2))


def test_deterministic_and_low_precision_keeps_its_dtype():
    tvs = [{"w": torch.tensor(t)} for t in _taus(3, (7, 5), seed=9)]
    a, b = merge("wudi", tvs, iters=30, lr=0.01), merge("wudi", tvs, iters=30, lr=0.01)
    assert torch.equal(a["w"], b["w"])
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
        low = [{"w": tv["w"].to(dtype)} for tv in tvs]
        out = merge("wudi", low, iters=30, lr=0.01)["w"]
        assert out.dtype == dtype and out.device.type == "cpu"
        ref = merge("wudi", [{"w": tv["w"].double()} for tv in low], iters=30, lr=0.01)["w"]
        np.testing.assert_allclose(out.double().numpy(), ref.numpy(), rtol=tol, atol=tol)


def test_lambda_is_the_authors_scaling_coefficient():
    taus = _taus(3, (5, 4), seed=10, scale=1e-3)
    delta = _merge(taus)
    theta0 = np.random.default_rng(11).normal(size=(5, 4))
    ref = ref_adam(sum(taus), taus, np.ones(3), 300, 1e-5)
    for coef in (0.5, 1.0):  # theirs: theta0 + coef * tau_m, coef = 1 in the paper
        eta = eta_for_lambda("wudi", coef, 3)
        assert eta == coef
        np.testing.assert_allclose(theta0 + eta * delta, theta0 + coef * ref, rtol=1e-9, atol=1e-12)


def test_registration_space_and_refusals():
    m = get_method("wudi")
    assert m.params == {"iters": 300, "lr": 1e-5, "others": "base"} and not m.coordinatewise
    assert m.takes_device and m.space == {} and knob_grids("wudi", {}) == {}
    assert lambda_scale("wudi") == "delta"
    assert method_configs()["wudi"] == {"name": "wudi", "iters": 300, "lr": 1e-5, "others": "base"}
    assert method_scope("wudi") == "exact"
    assert "WUDI-Merging" in m.paper.code
    assert_refused("wudi", {"iters": -1}, "iters .* integer >= 0")
    assert_refused("wudi", {"iters": 2.5}, "iters .* integer >= 0")
    assert_refused("wudi", {"lr": 0.0}, "lr .* > 0")
    assert_refused("wudi", {"others": "zero"}, "others .* 'base' .* 'mean'")
