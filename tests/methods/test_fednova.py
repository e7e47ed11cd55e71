"""FedNova against its definition in numpy, and its normaliser for the optimizer a client ran
(closed form by hand, and unrolled torch optimizers)."""

from __future__ import annotations

import pytest
import torch

from fl_merge.methods import merge
from fl_merge.methods.fednova import fednova_normaliser
from methods.helpers import WEIGHTS, assert_close, make_tvs, norm_p, stack


@pytest.mark.parametrize("w", WEIGHTS)
def test_fednova(w):
    tvs, a = make_tvs(6, 1), [1.0, 5.5, 2.0, 100.0, 3.0, 7.25]
    x, p = stack(tvs), norm_p(w, 6)
    a_eff = sum(p[i] * a[i] for i in range(6))
    ref = a_eff * sum(p[i] * x[i] / a[i] for i in range(6))
    assert_close(merge("fednova", tvs, w, normalisers=a), ref)
    # reported normalisers win over local steps
    assert_close(merge("fednova", tvs, w, [1] * 6, normalisers=a), ref)
    # local steps alone: the plain-SGD normaliser a_i = t_i, with a warning
    steps = [1, 5, 2, 10, 3, 7]
    with pytest.warns(UserWarning, match="plain-SGD normaliser"):
        out = merge("fednova", tvs, w, steps)
    assert_close(out, sum(p[i] * steps[i] for i in range(6)) * sum(p[i] * x[i] / steps[i] for i in range(6)))
    # equal normalisers: fednova is fedavg
    eq = merge("fednova", tvs, w, normalisers=[4.0] * 6)
    assert_close(eq, sum(p[i] * x[i] for i in range(6)))


@pytest.mark.parametrize("r", [0.0, 0.5, 0.9])
def test_momentum_normaliser_small_t_by_hand(r):
    # sum over the steps of the momentum buffer's geometric weights: 1, 1 + r, 1 + r + r^2
    assert fednova_normaliser(1, r) == pytest.approx(1.0, rel=1e-12)
    assert fednova_normaliser(2, r) == pytest.approx(1 + (1 + r), rel=1e-12)
    assert fednova_normaliser(3, r) == pytest.approx(1 + (1 + r) + (1 + r + r * r), rel=1e-12)
    assert fednova_normaliser(4, 0.5) == pytest.approx(1 + 1.5 + 1.75 + 1.875, rel=1e-12)


def test_plain_sgd_and_adam_normalisers_are_the_step_count():
    assert fednova_normaliser(297) == 297.0
    assert fednova_normaliser(19, 0.0, "sgd") == 19.0
    assert fednova_normaliser(297, 0.9, "adam") == 297.0  # beta1 ignored, documented


def _displacement(opt_cls, steps, lr=0.01, **kw):
    """Run `steps` steps of the optimizer on loss g . x (constant gradient g), float64."""
    g = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = opt_cls([x], lr=lr, **kw)
    for _ in range(steps):
        opt.zero_grad()
        (g * x).sum().backward()
        opt.step()
    return x.detach(), g, lr


@pytest.mark.parametrize("r", [0.0, 0.3, 0.9, 0.99])
@pytest.mark.parametrize("t", [1, 2, 5, 19, 297])
def test_momentum_normaliser_matches_unrolled_torch_sgd(r, t):
    """torch.optim.SGD(momentum=r) for t steps on a constant gradient moves x by exactly
    -lr * a * g: a is FedNova's ||a||_1 for that optimizer."""
    x, g, lr = _displacement(torch.optim.SGD, t, momentum=r)
    measured = (-x / (lr * g)).tolist()
    assert measured == pytest.approx([fednova_normaliser(t, r)] * 3, rel=1e-9)


@pytest.mark.parametrize("t", [1, 7, 50])
def test_adam_normaliser_matches_unrolled_adam(t):
    """Adam's bias-corrected step has size lr under a constant gradient, so the displacement
    is lr * t per coordinate, as for plain SGD with a unit gradient: a = t."""
    x, g, lr = _displacement(torch.optim.Adam, t, eps=1e-12)
    measured = (-x / (lr * torch.sign(g))).tolist()
    assert measured == pytest.approx([fednova_normaliser(t, 0.9, "adam")] * 3, rel=1e-6)


def test_issue_example_ratio():
    """297 vs 19 steps of SGD with momentum 0.9: 25.7x, where steps alone say 15.6x."""
    ratio = fednova_normaliser(297, 0.9) / fednova_normaliser(19, 0.9)
    assert round(ratio, 1) == 25.7
    assert round(fednova_normaliser(297) / fednova_normaliser(19), 1) == 15.6


@pytest.mark.parametrize("args,match", [
    ((0,), "steps must be a positive integer, got 0"),
    ((2.5,), "steps must be a positive integer"),
    ((True,), "steps must be a positive integer"),
    ((5, 1.0), r"momentum must lie in \[0, 1\), got 1.0"),
    ((5, -0.1), r"momentum must lie in \[0, 1\)"),
    ((5, 0.9, "rmsprop"), "optimizer must be one of"),
])
def test_normaliser_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        fednova_normaliser(*args)


def test_fednova_with_true_normalisers_undoes_momentum_bias():
    """Two clients run momentum SGD on the same constant gradient for 297 and 19 steps:
    with the momentum normalisers both normalised updates are the same single step
    -lr * g, so Delta = a_eff * (-lr g); with steps alone they disagree."""
    (x1, g, lr), (x2, _, _) = _displacement(torch.optim.SGD, 297, momentum=0.9), \
        _displacement(torch.optim.SGD, 19, momentum=0.9)
    tvs = [{"w": x1}, {"w": x2}]
    a = [fednova_normaliser(297, 0.9), fednova_normaliser(19, 0.9)]
    out = merge("fednova", tvs, normalisers=a)["w"]
    torch.testing.assert_close(out, -(a[0] + a[1]) / 2 * lr * g, rtol=1e-12, atol=0)
    with pytest.warns(UserWarning, match="plain-SGD normaliser"):
        steps_only = merge("fednova", tvs, local_steps=[297, 19])["w"]
    assert not torch.allclose(steps_only, out, rtol=1e-3)
