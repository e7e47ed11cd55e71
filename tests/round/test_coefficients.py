"""Learned coefficients: the client-side coefficient gradient against autograd through
theta0 + sum_ib lambda_ib tau_ib on a tiny model, the server's Adam against torch's, and the
stopping rule by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fl_merge.merging.learned import (
    combine,
    combine_gradients,
    coefficient_gradient,
    initial_coefficients,
    make_blocks,
    message_bytes,
    objective,
    parameter_gradient,
    server_step,
    should_stop,
    split_validation,
    stop_state,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)  # per-task, never merged

    def forward(self, x):
        return self.head(self.body(x))


def _setup(k=3, seed=0):
    torch.manual_seed(seed)
    model = Tiny().double()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = [n for n in theta0 if n.startswith("body.")]
    tvs = [{n: 0.3 * torch.randn_like(theta0[n]) for n in merged} for _ in range(k)]
    x = torch.randn(23, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    return model, theta0, merged, tvs, x, y


def _autograd_reference(model, theta0, tvs, blocks, lam0, x, y, kind):
    """d objective / d lambda by autograd with lambda a leaf of theta(lambda)."""
    lam = lam0.clone().requires_grad_(True)
    params = dict(theta0)
    for b, keys in enumerate(blocks):
        for key in keys:
            params[key] = theta0[key] + sum(lam[i, b] * tv[key] for i, tv in enumerate(tvs))
    logits = functional_call(model, params, (x,))
    loss = (nn.functional.cross_entropy(logits, y) if kind == "supervised"
            else -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean())
    loss.backward()
    return lam.grad


@pytest.mark.parametrize("kind", ["supervised", "entropy"])
@pytest.mark.parametrize("granularity", ["task", "block"])
def test_coefficient_gradient_equals_autograd_through_theta_of_lambda(kind, granularity):
    model, theta0, merged, tvs, x, y = _setup()
    blocks = make_blocks(merged, granularity)
    lam = torch.linspace(0.1, 0.9, len(tvs) * len(blocks), dtype=torch.float64).reshape(len(tvs), -1)
    ref = _autograd_reference(model, theta0, tvs, blocks, lam, x, y, kind)
    model.load_state_dict(combine(theta0, tvs, lam, blocks))
    grads = parameter_gradient(model, x, y if kind == "supervised" else None, kind, merged,
                               batch_size=7)  # 23 examples: uneven batches are averaged right
    ours = coefficient_gradient(grads, tvs, blocks)
    assert ours.shape == (len(tvs), len(blocks))
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    assert float(ref.abs().max()) > 1e-4  # a real gradient, not zeros on both sides


def test_task_wise_start_is_task_arithmetic_and_heads_are_untouched():
    _, theta0, merged, tvs, _, _ = _setup()
    lam = 0.35
    out = combine(theta0, tvs, initial_coefficients(3, 1, lam), make_blocks(merged, "task"))
    for key in merged:  # Task Arithmetic: theta0 + lambda * sum_i tau_i
        torch.testing.assert_close(out[key], theta0[key] + lam * (tvs[0][key] + tvs[1][key] + tvs[2][key]))
    for key in ("head.weight", "head.bias"):
        assert torch.equal(out[key], theta0[key])


def test_block_coefficients_scale_each_tensor_by_its_own_lambda():
    theta0 = {"a": torch.zeros(2), "b": torch.ones(3)}
    tvs = [{"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([1.0, 0.0, -1.0])},
           {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([2.0, 2.0, 2.0])}]
    lam = torch.tensor([[0.5, 2.0], [3.0, -1.0]])  # rows: vectors; columns: blocks a, b
    out = combine(theta0, tvs, lam, make_blocks(["a", "b"], "block"))
    torch.testing.assert_close(out["a"], torch.tensor([0.5, 4.0]))       # 0.5*[1,2] + 3*[0,1]
    torch.testing.assert_close(out["b"], torch.tensor([1.0, -1.0, -3.0]))  # 1 + 2*tau_0b - tau_1b


def test_entropy_objective_by_hand():
    uniform = torch.zeros(4, 5)
    assert float(objective(uniform, None, "entropy")) == pytest.approx(math.log(5))
    p = torch.tensor([[0.5, 0.25, 0.25]])
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert float(objective(p.log(), None, "entropy")) == pytest.approx(h)


def test_server_adam_equals_torch_adam_and_sgd_is_a_plain_step():
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(5)]
    start = torch.full((2, 3), 0.3, dtype=torch.float64)
    leaf = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([leaf], lr=0.05)
    ours, state = start, None
    for gr in grads:
        leaf.grad = gr.clone()
        opt.step()
        ours, state = server_step(ours, gr, state, lr=0.05)
    torch.testing.assert_close(ours, leaf.detach(), rtol=1e-12, atol=1e-12)
    assert state.t == 5
    new, none = server_step(start, grads[0], None, lr=0.1, optimizer="sgd")
    torch.testing.assert_close(new, start - 0.1 * grads[0])
    assert none is None


def test_combined_gradient_is_the_weighted_mean():
    a, b = torch.ones(2, 1), torch.full((2, 1), 4.0)
    torch.testing.assert_close(combine_gradients([a, b], [3, 1]), torch.full((2, 1), 1.75, dtype=torch.float64))


def test_stopping_keeps_the_best_and_stops_after_patience():
    s = None
    lam = [torch.full((1, 1), float(i)) for i in range(6)]
    for i, score in enumerate([0.5, 0.7, 0.6, 0.7, 0.65]):
        s = stop_state(s, lam[i], score)
    assert s.best_score == 0.7 and float(s.best) == 1.0 and s.stale == 3  # a tie is no gain
    assert should_stop(s, 5, 10, patience=3) and not should_stop(s, 5, 10, patience=4)
    assert should_stop(stop_state(None, lam[0], 0.1), 10, 10, patience=99)


def test_validation_halves_are_disjoint_and_cover_the_split():
    fit, stop = split_validation(7)
    assert fit == [0, 2, 4, 6] and stop == [1, 3, 5]
    assert split_validation(1) == ([0], [0])


def test_message_is_coefficients_only():
    assert message_bytes(8, 1) == 32 and message_bytes(2, 10) == 80


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="granularity must be one of"):
        make_blocks(["a"], "layer-ish")
    with pytest.raises(ValueError, match="no merged tensors"):
        make_blocks([], "task")
    with pytest.raises(ValueError, match=r"shape \[K=2, B=1\]"):
        combine({"a": torch.zeros(1)}, [{"a": torch.ones(1)}] * 2, torch.zeros(1, 1), [("a",)])
    with pytest.raises(ValueError, match="objective must be one of"):
        objective(torch.zeros(1, 2), None, "mse")
    with pytest.raises(ValueError, match="needs labels"):
        objective(torch.zeros(1, 2), None, "supervised")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        server_step(torch.zeros(1, 1), torch.zeros(1, 1), None, 0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="finite"):
        initial_coefficients(2, 1, float("nan"))


def test_the_loop_learns_coefficients_that_beat_the_start_on_held_out_validation():
    """Two clients share the rule y = [x0 + x1 > 0] on their own data; each task vector knows
    one half of it (client 0's reads x0, client 1's x1), so only the two together solve it.
    The start is theta0 (lambda 0, chance level); the learned task-wise coefficients must
    reach well above chance on the stop halves, which never drive the gradient."""
    from fl_merge.merging.learned import learn_coefficients

    torch.manual_seed(1)
    model = nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    clients = []
    for _ in range(2):
        x = torch.randn(200, 2, dtype=torch.float64)
        clients.append((x, (x.sum(1) > 0).long()))
    # each task vector: one half of the rule's direction
    tvs = [{"weight": torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64) * 0.1,
            "bias": torch.zeros(2, dtype=torch.float64)},
           {"weight": torch.tensor([[0.0, -1.0], [0.0, 1.0]], dtype=torch.float64) * 0.1,
            "bias": torch.zeros(2, dtype=torch.float64)}]
    blocks = make_blocks(list(theta0), "task")

    def ask(coefs):
        model.load_state_dict(combine(theta0, tvs, coefs, blocks))
        out = []
        for x, y in clients:
            fit, stop = split_validation(len(y))
            g = parameter_gradient(model, x[fit], y[fit], "supervised", list(theta0))
            with torch.no_grad():
                acc = float((model(x[stop]).argmax(1) == y[stop]).double().mean())
            out.append((coefficient_gradient(g, tvs, blocks), acc, len(y)))
        return out

    best, history = learn_coefficients(ask, initial_coefficients(2, 1, 0.0), rounds=40, lr=0.5,
                                       patience=40)
    assert history[0]["score"] <= 0.6  # theta0: both logits equal, chance
    assert max(h["score"] for h in history) >= 0.9
    assert float(best.min()) > 0  # both task vectors are switched on
    with pytest.raises(ValueError, match="patience >= 1"):
        learn_coefficients(ask, initial_coefficients(2, 1, 0.0), rounds=1, lr=0.1, patience=0)


# ------------------------------------------------------------------ the round's step
def test_round_start_is_the_validated_fedavg_merge():
    from fl_merge.methods import merge
    from fl_merge.round import coefficients as rc

    _, theta0, merged, tvs, _, _ = _setup()
    w = [1.0, 3.0, 4.0]
    blocks = make_blocks(merged, "block")
    start = rc.start_coefficients(0.8, w, len(blocks))
    assert start.shape == (3, len(blocks))
    delta = rc.learned_delta(tvs, start, blocks)
    ref = merge("fedavg", tvs, w)  # theta0 + eta * sum_i p_i tau_i at eta 0.8
    for key in merged:
        torch.testing.assert_close(delta[key], 0.8 * ref[key])


def test_round_messages_round_trip_and_bad_replies_are_named():
    from fl_merge.round import coefficients as rc

    lam = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    cfg = rc.request_config(lam, [("a",), ("b", "c")], "entropy", with_vectors=True)
    assert cfg[rc.BLOCKS] == ["a", "b|c"]
    got, obj = rc.parse_request(cfg)
    assert torch.equal(got, lam) and obj == "entropy"
    assert rc.BLOCKS not in rc.request_config(lam, [("a",), ("b",)], "entropy", False)
    g, acc = rc.parse_reply({rc.GRAD: [1.0, 2.0, 3.0, 4.0], rc.SCORE: 0.75}, 2, 2)
    assert g.tolist() == [[1.0, 2.0], [3.0, 4.0]] and acc == 0.75
    with pytest.raises(ValueError, match="no 'coef-grad' list of 2 x 2"):
        rc.parse_reply({rc.GRAD: [1.0], rc.SCORE: 0.5}, 2, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rc.parse_reply({rc.GRAD: [1.0, math.nan, 0.0, 0.0], rc.SCORE: 0.5}, 2, 2)
    with pytest.raises(ValueError, match="no 'coef-val-accuracy'"):
        rc.parse_reply({rc.GRAD: [0.0] * 4}, 2, 2)
    assert rc.normalised_score(0.45, 0.9) == pytest.approx(0.5) and rc.normalised_score(0.4, None) == 0.4


def test_round_settings_are_checked():
    from fl_merge.round.coefficients import check_settings, learned_candidate

    check_settings("off", "junk", 0, -1.0, "junk", [])  # off: nothing else is read
    check_settings("task", "entropy", 3, 0.1, "adam", ["fedavg"])
    with pytest.raises(ValueError, match="coef-rounds must be at least 1"):
        check_settings("task", "entropy", 0, 0.1, "adam", ["fedavg"])
    with pytest.raises(ValueError, match="coef-lr must be a positive number"):
        check_settings("block", "entropy", 2, math.inf, "adam", ["fedavg"])
    cand = learned_candidate("task", "supervised")
    assert cand.label == "learned-task" and cand.etas == [0.0, 1.0] and cand.lam(1.0, 5) == 1.0
