"""The learned-coefficient phase of a round (issue 16; the math is fl_merge.merging.learned).

Where the task vectors live: the server sends each client theta0 (with the client's own
per-task parameters) and the K task vectors ONCE, in the phase's first message; the client
keeps them in its Flower node state (`Context.state`) for the phase. Every later message
carries only the coefficients (K x B scalars) and every reply only the coefficient gradient
(K x B scalars) and a validation score. Why not leave each vector with its owner: a client
needs theta(lambda) = theta0 + sum lambda_ib tau_ib to evaluate its objective, which takes
every vector; leaving them at their owners means the server ships theta(lambda) down and a
full gradient back every round (two model-sized messages per client per round) instead of
K x B numbers. The cost is that every client sees every task vector once: a disclosure a
deployment with private updates must weigh (the one-shot merge already gives it the mean).
A client that lost its state (restarted) replies `coef-missing-vectors` and is sent them
again (counted in the bytes).

The start is Task Arithmetic at its validated scale: fedavg's Delta is sum_i p_i tau_i, so
its chosen eta gives lambda_i = eta * p_i for every block (round 0 scores exactly that
merge). The learned model is theta0 + Delta_learned with Delta_learned = sum_ib lambda_ib
tau_ib, i.e. eta = 1: it is scored like any candidate, on validation then test at eta 1.
The clients' gradient uses the even-position half of their validation split and the stopping
score the odd half (fl_merge.merging.learned.split_validation); test data is never read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fl_merge.merging.learned import GRANULARITIES, OBJECTIVES, OPTIMIZERS, combine
from fl_merge.core.task_vectors import StateDict

MODES = ("off", *GRANULARITIES)
TA_NAMES = ("task_arithmetic", "fedavg")
# Message keys (docs/protocol.md).
COEFS = "coef-values"  # config: the K x B coefficients, row-major (vector-major)
SHAPE = "coef-shape"  # config: [K, B]
BLOCKS = "coef-blocks"  # config, first message only: the tensor names of each block, "|"-joined
OBJECTIVE = "coef-objective"
GRAD = "coef-grad"  # reply: the K x B gradient, row-major
SCORE = "coef-val-accuracy"  # reply: accuracy of theta(lambda) on the stop half of val
MISSING = "coef-missing-vectors"  # reply: the client holds no task vectors (resend them)
VECTOR_PREFIX = "coef-tau-"  # ArrayRecord keys "coef-tau-0", ... (first message)
BASE = "coef-theta0"  # ArrayRecord key of theta0 + the client's per-task parameters


def learned_label(mode: str) -> str:
    """The learned model's label in results: "learned-task" or "learned-block"."""
    return f"learned-{mode}"


def check_settings(mode: str, objective: str, rounds: int, lr: float, optimizer: str,
                   method_names: Sequence[str]) -> None:
    """ValueError (one line) for a bad setting of the phase, before any training."""
    if mode not in MODES:
        raise ValueError(f"learn-coefficients must be one of {', '.join(MODES)}, got '{mode}'")
    if mode == "off":
        return
    if objective not in OBJECTIVES:
        raise ValueError(f"coef-objective must be one of {', '.join(OBJECTIVES)}, got '{objective}'")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"coef-optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
    if int(rounds) < 1:
        raise ValueError(f"coef-rounds must be at least 1, got {rounds}")
    if not 0 < float(lr) < float("inf"):
        raise ValueError(f"coef-lr must be a positive number, got {lr}")
    if not any(n in TA_NAMES for n in method_names):
        raise ValueError("learn-coefficients starts from Task Arithmetic's validated scale: add "
                         "method task_arithmetic (or fedavg) to the methods")


def start_coefficients(eta: float, weights: Sequence[float], num_blocks: int) -> torch.Tensor:
    """lambda_ib = eta * p_i (float64 [K, B]): theta(lambda) = theta0 + eta sum_i p_i tau_i,
    the validated Task Arithmetic (fedavg) merge."""
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    return (float(eta) * w / w.sum()).reshape(-1, 1).repeat(1, num_blocks)


def learned_delta(task_vectors: Sequence[Mapping[str, torch.Tensor]], coefs: torch.Tensor,
                  blocks: Sequence[Sequence[str]]) -> StateDict:
    """Delta_learned = sum_ib lambda_ib tau_ib (theta0 + 1 * Delta is the learned model)."""
    zero = {k: torch.zeros_like(v) for k, v in task_vectors[0].items()}
    return combine(zero, task_vectors, coefs, blocks)


def request_config(coefs: torch.Tensor, blocks: Sequence[Sequence[str]], objective: str,
                   with_vectors: bool) -> dict[str, Any]:
    """The config entries of one coefficient message (the blocks only with the vectors)."""
    cfg: dict[str, Any] = {COEFS: [float(v) for v in coefs.reshape(-1)],
                           SHAPE: [int(coefs.shape[0]), int(coefs.shape[1])], OBJECTIVE: objective}
    if with_vectors:
        cfg[BLOCKS] = ["|".join(b) for b in blocks]
    return cfg


def parse_request(config: Mapping[str, Any]) -> tuple[torch.Tensor, str]:
    """(coefficients [K, B], objective) from a coefficient message's config."""
    k, b = (int(x) for x in config[SHAPE])
    values = [float(v) for v in config[COEFS]]
    if len(values) != k * b:
        raise ValueError(f"{COEFS} holds {len(values)} values, {SHAPE} says {k} x {b}")
    return torch.tensor(values, dtype=torch.float64).reshape(k, b), str(config[OBJECTIVE])


def parse_reply(metrics: Mapping[str, Any], k: int, b: int) -> tuple[torch.Tensor, float]:
    """(gradient [K, B], stop-half validation accuracy) from a client's reply; ValueError
    naming what is missing or malformed."""
    grad = metrics.get(GRAD)
    if not isinstance(grad, list) or len(grad) != k * b:
        raise ValueError(f"reply has no '{GRAD}' list of {k} x {b} numbers")
    if SCORE not in metrics:
        raise ValueError(f"reply has no '{SCORE}' metric")
    g = torch.tensor([float(v) for v in grad], dtype=torch.float64).reshape(k, b)
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"'{GRAD}' holds NaN or Inf")
    return g, float(metrics[SCORE])


def normalised_score(accuracy: float, finetuned_val: float | None) -> float:
    """The stopping score of one client: its stop-half accuracy over its fine-tuned model's
    validation accuracy (the round's selection criterion), raw accuracy when unknown."""
    return accuracy / finetuned_val if finetuned_val else accuracy


def phase_candidate(label: str, name: str, params: dict[str, Any]):
    """A model added after the choice (learned coefficients, greedy soup) as a round
    candidate: scored at eta 0 (the base) and 1 (theta0 + its Delta); its lambda is its eta
    (its Delta carries its own scale)."""
    from fl_merge.round.candidates import Candidate

    class PhaseCandidate(Candidate):
        def lam(self, eta: float, num_models: int) -> float:
            return float(eta)

    return PhaseCandidate(label, label, name, dict(params), {}, [0.0, 1.0])


def learned_candidate(mode: str, objective: str):
    """The learned model's candidate, "learned-<mode>" (see `phase_candidate`)."""
    return phase_candidate(learned_label(mode), "learned_coefficients",
                           {"coefficients": mode, "objective": objective})
