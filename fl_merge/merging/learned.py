"""Learned merge coefficients: aTLAS-style anisotropic scaling and AdaMerging, as a short
federated phase after the one-shot merge (issue 16). Pure functions only.

Model: theta(lambda) = theta0 + sum_i sum_b lambda_ib tau_ib, with tau_ib task vector i
restricted to block b of the merged parameters (aTLAS, Zhang et al., NeurIPS 2024,
"Knowledge Composition using Task Vectors with Learned Anisotropic Scaling"; AdaMerging,
Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning").
Blocks: "task" = one block holding every merged tensor (task-wise coefficients, K scalars),
"block" = one block per merged tensor (K x B scalars, B tensors; AdaMerging's layer-wise
and aTLAS's per-parameter-block coefficients at tensor granularity).

Gradient: theta(lambda) is linear in lambda, so for client j's objective L_j
    dL_j / dlambda_ib = < grad_b L_j(theta(lambda)), tau_ib >,
the inner product of the ordinary parameter gradient (over block b's tensors) with task
vector i's block (`coefficient_gradient`). A client needs theta(lambda) and the task
vectors, computes one backward pass and returns K x B numbers. Objectives: "supervised"
(aTLAS: cross-entropy on the client's labelled examples) and "entropy" (AdaMerging: mean
Shannon entropy of the predicted class distribution on unlabelled inputs).

Server: the global objective is sum_j p_j L_j, so its gradient is sum_j p_j g_j
(`combine_gradients`); one step of Adam (Kingma & Ba 2015, bias-corrected, as AdaMerging
optimises its coefficients) or plain SGD (`server_step`). Coefficients start from the best
validated Task Arithmetic scale (`initial_coefficients`: lambda_ib = lambda_TA for every
i and b, so round 0 is exactly that merge). Stopping on validation (`stop_state`): the best
validated coefficients so far are kept, and the phase stops after `patience` rounds
without improvement. To keep the stopping criterion honest, the gradient uses one half of
each client's validation split and the stopping score the other (`split_validation`); test
data is never used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fl_merge.core.task_vectors import StateDict

GRANULARITIES = ("task", "block")
OBJECTIVES = ("supervised", "entropy")
OPTIMIZERS = ("adam", "sgd")


def make_blocks(keys: Sequence[str], granularity: str) -> list[tuple[str, ...]]:
    """The coefficient blocks over the merged tensor names `keys`, in order: "task" -> one
    block of every key; "block" -> one block per key."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"coefficient granularity must be one of {GRANULARITIES}, got {granularity!r}")
    keys = list(keys)
    if not keys:
        raise ValueError("no merged tensors to learn coefficients for")
    return [tuple(keys)] if granularity == "task" else [(k,) for k in keys]


def initial_coefficients(num_vectors: int, num_blocks: int, lam: float) -> torch.Tensor:
    """lambda_ib = lam for every vector i and block b (float64 [K, B]): theta(lambda) is then
    Task Arithmetic at lam (theta0 + lam sum_i tau_i; from a chosen fedavg eta, lam = eta / K)."""
    if not math.isfinite(float(lam)):
        raise ValueError(f"the initial coefficient must be a finite number, got {lam!r}")
    return torch.full((num_vectors, num_blocks), float(lam), dtype=torch.float64)


def combine(theta0: Mapping[str, torch.Tensor], task_vectors: Sequence[Mapping[str, torch.Tensor]],
            coefs: torch.Tensor, blocks: Sequence[Sequence[str]]) -> StateDict:
    """theta0 + sum_i sum_b coefs[i, b] tau_i[block b] over the blocks' tensors; tensors of
    theta0 outside every block are copied unchanged (per-task heads). theta0's dtypes kept."""
    c = torch.as_tensor(coefs, dtype=torch.float64)
    if tuple(c.shape) != (len(task_vectors), len(blocks)):
        raise ValueError(f"coefficients must have shape [K={len(task_vectors)}, B={len(blocks)}], "
                         f"got {tuple(c.shape)}")
    out = {k: v.detach().clone() for k, v in theta0.items()}
    for b, keys in enumerate(blocks):
        for key in keys:
            acc = theta0[key].detach().double().clone()
            for i, tv in enumerate(task_vectors):
                acc.add_(tv[key].double(), alpha=float(c[i, b]))
            out[key] = acc.to(theta0[key].dtype)
    return out


def coefficient_gradient(grads: Mapping[str, torch.Tensor],
                         task_vectors: Sequence[Mapping[str, torch.Tensor]],
                         blocks: Sequence[Sequence[str]]) -> torch.Tensor:
    """g[i, b] = sum over block b's tensors of < grads[key], tau_i[key] > (float64 [K, B]):
    dL / dlambda_ib for theta(lambda) = theta0 + sum lambda_ib tau_ib, given the parameter
    gradient `grads` = grad_theta L at theta(lambda). A tensor without a gradient (unused
    by the objective) contributes 0."""
    g = torch.zeros(len(task_vectors), len(blocks), dtype=torch.float64)
    for b, keys in enumerate(blocks):
        for key in keys:
            gk = grads.get(key)
            if gk is None:
                continue
            gk = gk.detach().double().reshape(-1)
            for i, tv in enumerate(task_vectors):
                g[i, b] += torch.dot(gk, tv[key].detach().double().reshape(-1))
    return g


def objective(logits: torch.Tensor, labels: torch.Tensor | None, kind: str) -> torch.Tensor:
    """A batch's mean objective: "supervised" cross-entropy (aTLAS) or "entropy" of the
    softmax predictions, -sum_c p_c log p_c (AdaMerging; labels unused)."""
    if kind == "supervised":
        if labels is None:
            raise ValueError("the supervised objective needs labels")
        return torch.nn.functional.cross_entropy(logits, labels)
    if kind == "entropy":
        logp = torch.log_softmax(logits, dim=1)
        return -(logp.exp() * logp).sum(1).mean()
    raise ValueError(f"coefficient objective must be one of {OBJECTIVES}, got {kind!r}")


def parameter_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                       kind: str, keys: Sequence[str], batch_size: int = 256) -> StateDict:
    """grad_theta of the mean objective over the examples x (labels y) for the model's
    parameters named in `keys` (the merged ones), accumulated over batches with weights
    batch size / n so the result is the gradient of the mean over all examples. The model is
    put in eval mode (no dropout or batch-norm updates: the objective of the fixed model)."""
    model.eval()
    params = dict(model.named_parameters())
    wanted = [params[k] for k in keys if k in params]
    names = [k for k in keys if k in params]
    total = {k: torch.zeros_like(params[k]) for k in names}
    n = len(x)
    device = next(model.parameters()).device
    for s in range(0, n, batch_size):
        xb = x[s:s + batch_size].to(device)
        yb = None if y is None else y[s:s + batch_size].to(device)
        loss = objective(model(xb), yb, kind) * (len(xb) / n)
        gs = torch.autograd.grad(loss, wanted, allow_unused=True)
        for k, gk in zip(names, gs):
            if gk is not None:
                total[k] += gk
    return {k: v.cpu() for k, v in total.items()}


def combine_gradients(grads: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_j p_j g_j with p_j = w_j / sum w: the gradient of the weighted mean objective."""
    w = torch.as_tensor([float(v) for v in weights], dtype=torch.float64)
    if len(grads) != len(w) or not len(w) or not bool((w >= 0).all()) or float(w.sum()) <= 0:
        raise ValueError(f"need one non-negative weight per gradient ({len(grads)}), positive in sum")
    p = w / w.sum()
    return sum(pj * g.to(torch.float64) for pj, g in zip(p, grads))


@dataclass(frozen=True)
class AdamState:
    """Adam's first and second moments and step count (float64 [K, B])."""

    m: torch.Tensor
    v: torch.Tensor
    t: int = 0


def server_step(coefs: torch.Tensor, grad: torch.Tensor, state: AdamState | None, lr: float,
                optimizer: str = "adam", betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8) -> tuple[torch.Tensor, AdamState | None]:
    """One descent step on the coefficients. "sgd": lambda - lr g. "adam" (Kingma & Ba 2015):
    m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, lambda - lr m_hat / (sqrt(v_hat) + eps)
    with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t). Returns (new coefficients, state)."""
    c = coefs.to(torch.float64)
    g = grad.to(torch.float64)
    if optimizer == "sgd":
        return c - lr * g, None
    if optimizer != "adam":
        raise ValueError(f"coefficient optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if state is None:
        state = AdamState(torch.zeros_like(c), torch.zeros_like(c), 0)
    b1, b2 = betas
    t = state.t + 1
    m = b1 * state.m + (1 - b1) * g
    v = b2 * state.v + (1 - b2) * g * g
    step = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return c - lr * step, AdamState(m, v, t)


@dataclass(frozen=True)
class StopState:
    """The best validated coefficients so far, their score, and rounds since it improved."""

    best: torch.Tensor
    best_score: float
    stale: int = 0


def stop_state(state: StopState | None, coefs: torch.Tensor, score: float) -> StopState:
    """Update the early-stopping record with the validation `score` (higher is better) of
    `coefs`: a strictly better score becomes the best (stale 0), else stale grows by one."""
    if state is None or score > state.best_score:
        return StopState(coefs.detach().clone(), float(score), 0)
    return StopState(state.best, state.best_score, state.stale + 1)


def should_stop(state: StopState, round_idx: int, max_rounds: int, patience: int) -> bool:
    """Stop after `max_rounds` coefficient rounds, or after `patience` rounds in a row
    without a better validation score."""
    return round_idx >= max_rounds or state.stale >= patience


def split_validation(n: int) -> tuple[list[int], list[int]]:
    """Indices of a validation split of n examples into (fit, stop): even positions drive
    the coefficient gradient, odd ones the stopping score, so the stopping criterion is not
    scored on the examples the coefficients were fitted to. n = 1: the one example is both."""
    if n < 1:
        raise ValueError(f"a validation split needs at least one example, got {n}")
    fit, stop = list(range(0, n, 2)), list(range(1, n, 2))
    return fit, stop or fit


def message_bytes(num_vectors: int, num_blocks: int, itemsize: int = 4) -> int:
    """Payload of one coefficient message: K x B scalars (float32 by default)."""
    return num_vectors * num_blocks * itemsize


def learn_coefficients(ask, start: torch.Tensor, *, rounds: int, lr: float,
                       optimizer: str = "adam", patience: int = 3
                       ) -> tuple[torch.Tensor, list[dict]]:
    """The server's loop. `ask(coefs)` is one federated round: it sends the coefficients
    (K x B scalars) to the clients and returns one (gradient [K, B] on the client's fit half,
    validation score on its stop half, weight) per client. Round 0 scores `start` ([K, B],
    e.g. Task Arithmetic at its validated scale), so the result is never worse on
    validation than it; then one optimizer step per round on the clients' weighted mean
    gradient, until `rounds` steps or `patience` rounds without a better weighted-mean
    score. Returns (the best validated
    coefficients, one record per round: round, score, gradient norm)."""
    if int(rounds) < 0 or int(patience) < 1:
        raise ValueError(f"rounds must be >= 0 and patience >= 1, got {rounds} and {patience}")
    coefs = torch.as_tensor(start, dtype=torch.float64).clone()
    adam, stop, history = None, None, []
    for r in range(int(rounds) + 1):
        answers = list(ask(coefs))
        if not answers:
            raise ValueError(f"coefficient round {r}: no client answered")
        grads, scores, weights = zip(*answers)
        w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
        score = float((w * torch.as_tensor(scores, dtype=torch.float64)).sum() / w.sum())
        stop = stop_state(stop, coefs, score)
        grad = combine_gradients(grads, weights)
        history.append({"round": r, "score": score, "grad-norm": float(grad.norm())})
        if should_stop(stop, r, int(rounds), int(patience)):
            break
        coefs, adam = server_step(coefs, grad, adam, lr, optimizer)
    return stop.best, history
