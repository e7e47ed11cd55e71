"""Model soups over the clients' fine-tuned models (Wortsman et al., ICML 2022, "Model soups:
averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time"). With one theta0, a soup of the models in S is
theta0 + mean_{i in S} tau_i = mean_{i in S} theta_i.

* uniform soup: every model, S = all K: fedavg (uniform weights) at eta = 1;
* greedy soup (Algorithm 1 there): models sorted by their own validation score, best first;
  the soup starts with the best one and adds the next model whenever the soup with it
  scores at least as well on validation as the soup without it (">=", as the paper's
  algorithm), else skips it. K - 1 validation evaluations after the K single-model ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import StateDict


def ingredient_order(scores: Sequence[float]) -> list[int]:
    """Model indices by validation score, best first (ties: the lower index first)."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))


def keep_ingredient(soup_score: float, with_score: float) -> bool:
    """Greedy soup's rule: keep the candidate when the soup with it scores >= without it."""
    return float(with_score) >= float(soup_score)


def soup_delta(task_vectors: Sequence[Mapping[str, torch.Tensor]], members: Sequence[int]) -> StateDict:
    """mean_{i in members} tau_i (theta0 + this is the soup of those models), float64 sums
    cast back to the task vectors' dtypes."""
    if not members:
        raise ValueError("a soup needs at least one model")
    ref = task_vectors[members[0]]
    return {k: (sum(task_vectors[i][k].double() for i in members) / len(members)).to(v.dtype)
            for k, v in ref.items()}


def greedy_soup(scores: Sequence[float], evaluate) -> tuple[list[int], list[dict]]:
    """Greedy soup given each model's own validation score and `evaluate(members) -> score`
    (the soup of `members` scored on validation). Returns (members in the order added, one
    record per tried model: index, score with it, kept)."""
    order = ingredient_order(scores)
    members, best = [order[0]], float(scores[order[0]])
    history = [{"model": order[0], "score": best, "kept": True}]
    for i in order[1:]:
        score = float(evaluate([*members, i]))
        kept = keep_ingredient(best, score)
        history.append({"model": i, "score": score, "kept": kept})
        if kept:
            members.append(i)
            best = score
    return members, history
