"""Heterogeneity metrics over client task vectors and gradients.

Each client i sends a task vector tau_i = theta_i - theta0 (a ``dict[str, torch.Tensor]``);
K clients, weights p_i (uniform by default, else w_i / sum_j w_j). Every metric treats
*all* tensors of a dict as one flattened vector, in the order of the first dict's keys, but
streams over them tensor by tensor (in slices of at most ``_CHUNK`` coordinates), so the K
full vectors are never concatenated. All accumulation is in float64 on the tensors' device;
results are plain python floats / lists (JSON-serializable).

Everything here is a small pure function. Inputs are validated with
`fl_merge.core.task_vectors.check_task_vectors` (same keys, shapes and dtypes, floating point,
finite); violations raise `MergeInputError`, a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from fl_merge.merging.registry import normalized_weights
from fl_merge.core.task_vectors import MergeInputError, check_task_vectors

TensorDicts = Sequence[Mapping[str, torch.Tensor]]

# Coordinates of one tensor handled at a time: each block is a [K, <= _CHUNK] float64 matrix.
_CHUNK = 1 << 20
# a_j counts as 1 (unanimous) when a_j >= 1 - _TOL; a_j counts as >= rho when a_j >= rho - _TOL.
_TOL = 1e-12


# ----------------------------------------------------------------------------- helpers


def _check(tvs: TensorDicts, what: str = "task vectors") -> int:
    """Validate a list of tensor dicts; return the total number of coordinates n."""
    if tvs is None or len(tvs) == 0:
        raise MergeInputError(f"no {what} given")
    check_task_vectors(tvs)
    n = sum(int(v.numel()) for v in tvs[0].values())
    if n == 0:
        raise MergeInputError(f"{what} have no coordinates (all tensors are empty)")
    return n


def _blocks(tvs: TensorDicts) -> Iterator[torch.Tensor]:
    """Yield [K, m] float64 blocks that together tile the flattened vectors (key order of
    tvs[0]); at most `_CHUNK` coordinates of one tensor per block."""
    for key in tvs[0].keys():
        flats = [tv[key].detach().reshape(-1) for tv in tvs]
        n = flats[0].numel()
        for start in range(0, n, _CHUNK):
            yield torch.stack([f[start:start + _CHUNK].to(torch.float64) for f in flats])


def _gram(tvs: TensorDicts) -> torch.Tensor:
    """G_ij = <tau_i, tau_j> (float64, CPU), accumulated block by block."""
    k = len(tvs)
    g = None
    for x in _blocks(tvs):
        part = x @ x.T
        g = part if g is None else g + part
    return (g if g is not None else torch.zeros(k, k, dtype=torch.float64)).cpu()


def _cosine_from_gram(g: torch.Tensor) -> torch.Tensor:
    """C_ij = G_ij / sqrt(G_ii G_jj); 0 where a norm is 0; 1 on the diagonal; clamped to [-1, 1]."""
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    c = torch.where(denom > 0, g / torch.where(denom > 0, denom, torch.ones_like(denom)),
                    torch.zeros_like(g))
    c = c.clamp(-1.0, 1.0)
    c.fill_diagonal_(1.0)
    return c


def _off_diagonal(c: torch.Tensor) -> torch.Tensor:
    k = c.shape[0]
    return c[~torch.eye(k, dtype=torch.bool)]


# ----------------------------------------------------------------------------- metrics


def task_vector_norms(tvs: TensorDicts) -> list[float]:
    """||tau_i||_2 = sqrt(sum_j tau_{i,j}^2) over all tensors of each task vector, per client."""
    _check(tvs)
    sq = torch.zeros(len(tvs), dtype=torch.float64)
    for x in _blocks(tvs):
        sq += x.pow(2).sum(1).cpu()
    return [float(v) for v in sq.sqrt()]


def cosine_matrix(tvs: TensorDicts) -> torch.Tensor:
    """C_ij = <tau_i, tau_j> / (||tau_i|| ||tau_j||), a [K, K] float64 tensor.

    Computed from the Gram matrix G_ij = <tau_i, tau_j> accumulated tensor by tensor.
    Convention for zero vectors: C_ij = 0 off the diagonal when ||tau_i|| = 0 or
    ||tau_j|| = 0, and C_ii = 1 always. Entries are clamped to [-1, 1] against rounding.
    """
    _check(tvs)
    return _cosine_from_gram(_gram(tvs))


def gradient_dissimilarity(
    grads: TensorDicts, weights: Sequence[float] | torch.Tensor | None = None
) -> dict[str, float]:
    """Dissimilarity of per-client gradients g_i at theta0, with g = sum_i p_i g_i.

    Returns
      * ``grad_diversity``  G^2 = sum_i p_i ||g_i - g||^2  (the G^2 / zeta^2 gradient
        dissimilarity of Karimireddy et al., SCAFFOLD, and Woodworth et al.);
      * ``b_dissimilarity`` B^2 = (sum_i p_i ||g_i||^2) / ||g||^2  (Li et al., FedProx,
        Definition 3): 1 when all g_i are equal, larger = more dissimilar; ``inf`` when
        ||g|| = 0 (including all-zero gradients);
      * ``mean_grad_norm``  ||g||.

    Identity: sum_i p_i ||g_i||^2 = ||g||^2 + G^2, hence B^2 = 1 + G^2 / ||g||^2.
    G^2 is accumulated directly (not as a difference of the two sides), so it is >= 0 and
    exactly 0 up to rounding for identical clients.
    """
    _check(grads, "gradients")
    p = normalized_weights(weights, len(grads))
    mean_sq = 0.0  # sum_i p_i ||g_i||^2
    g_sq = 0.0     # ||g||^2
    div = 0.0      # sum_i p_i ||g_i - g||^2
    for x in _blocks(grads):
        pd = p.to(x.device)
        g = pd @ x
        mean_sq += float(pd @ x.pow(2).sum(1))
        g_sq += float(g.pow(2).sum())
        div += float(pd @ (x - g).pow(2).sum(1))
    b2 = mean_sq / g_sq if g_sq > 0 else math.inf
    return {"grad_diversity": div, "b_dissimilarity": b2, "mean_grad_norm": math.sqrt(g_sq)}


def sign_agreement(
    tvs: TensorDicts,
    weights: Sequence[float] | torch.Tensor | None = None,
    rho: float | None = None,
) -> dict[str, float]:
    """Per-coordinate sign agreement a_j = |sum_i p_i sign(tau_{i,j})| (the quantity FedGMA
    masks on), over all n coordinates of all tensors; sign(0) = 0.

    Returns
      * ``sign_agreement``     mean_j a_j  (1 = all clients agree everywhere; 0 for two
        equally weighted opposite updates);
      * ``unanimous_fraction`` (1/n) #{j : a_j = 1} (tolerance 1e-12), i.e. the fraction of
        coordinates where every client with p_i > 0 is nonzero and all share one sign;
      * ``above_rho_fraction`` (1/n) #{j : a_j >= rho} (tolerance 1e-12), only when `rho`
        is given (rho in [0, 1]); these are the coordinates FedGMA passes unmasked.
    """
    n = _check(tvs)
    if rho is not None and not 0.0 <= float(rho) <= 1.0:
        raise MergeInputError(f"rho must lie in [0, 1], got {rho}")
    p = normalized_weights(weights, len(tvs))
    total = 0.0
    unanimous = 0
    above = 0
    for x in _blocks(tvs):
        a = (p.to(x.device) @ torch.sign(x)).abs()
        total += float(a.sum())
        unanimous += int((a >= 1.0 - _TOL).sum())
        if rho is not None:
            above += int((a >= float(rho) - _TOL).sum())
    out = {"sign_agreement": total / n, "unanimous_fraction": unanimous / n}
    if rho is not None:
        out["above_rho_fraction"] = above / n
    return out


def spread(values: Sequence[float]) -> float:
    """Coefficient of variation CV = std / |mean| with the population std
    (ddof = 0): sqrt((1/n) sum (v - mean)^2) / |mean|.

    0.0 for a single value or when all values are equal (zeros included). Raises ValueError
    for an empty input, non-finite values, or mean 0 with unequal values.
    """
    v = [float(x) for x in values]
    if len(v) == 0:
        raise ValueError("spread of an empty list of values")
    if not all(math.isfinite(x) for x in v):
        raise ValueError(f"spread of non-finite values: {v}")
    if all(x == v[0] for x in v):
        return 0.0
    mean = math.fsum(v) / len(v)
    if mean == 0.0:
        raise ValueError(f"spread (coefficient of variation) undefined for mean 0: {v}")
    var = math.fsum((x - mean) ** 2 for x in v) / len(v)
    return math.sqrt(var) / abs(mean)


def gain_recovered(base: float | Sequence[float], individual: float | Sequence[float],
                   merged: float | Sequence[float]) -> float:
    """Share of the fine-tuning gain a merged model keeps (Ilharco et al. 2023 report the
    same ratio as "normalized accuracy" gains; issue 14's headroom criterion):

        recovery = (mean(merged) - mean(base)) / (mean(individual) - mean(base))

    each argument one accuracy or a per-task list (means over tasks, the same tasks in each).
    1 = the merged model is as good as the fine-tuned ones, 0 = no better than the base,
    negative = worse than the base. Raises ValueError for unequal lengths, non-finite values
    or no gain (mean(individual) <= mean(base)): the ratio then has no meaning.
    """
    lists = [[float(x) for x in (v if isinstance(v, Sequence) else [v])]
             for v in (base, individual, merged)]
    if len({len(v) for v in lists}) != 1 or not lists[0]:
        raise ValueError(f"gain_recovered needs the same non-empty number of tasks in base, "
                         f"individual and merged, got {[len(v) for v in lists]}")
    if not all(math.isfinite(x) for v in lists for x in v):
        raise ValueError(f"gain_recovered of non-finite accuracies: {lists}")
    b, i, m = (math.fsum(v) / len(v) for v in lists)
    if i <= b:
        raise ValueError(f"gain_recovered needs fine-tuning to gain over the base: individual "
                         f"{i:.4g} <= base {b:.4g}")
    return (m - b) / (i - b)


def training_heterogeneity(
    local_steps: Sequence[float], lrs: Sequence[float] | float | None = None
) -> dict[str, float]:
    """Heterogeneity of local training lengths.

    Returns ``steps_cv`` = spread(E_i) over local step counts E_i and, when learning rates
    are given (one per client, or one float for all), ``lr_steps_cv`` = spread(eta_i E_i),
    the CV of the effective step length eta_i * E_i.
    """
    steps = [float(s) for s in local_steps]
    if len(steps) == 0:
        raise ValueError("no local step counts given")
    out = {"steps_cv": spread(steps)}
    if lrs is not None:
        lr = [float(lrs)] * len(steps) if isinstance(lrs, (int, float)) else [float(x) for x in lrs]
        if len(lr) != len(steps):
            raise ValueError(f"{len(lr)} learning rates for {len(steps)} local step counts")
        out["lr_steps_cv"] = spread([a * b for a, b in zip(lr, steps)])
    return out


def heterogeneity_report(
    tvs: TensorDicts,
    weights: Sequence[float] | torch.Tensor | None = None,
    grads: TensorDicts | None = None,
    local_steps: Sequence[float] | None = None,
    lrs: Sequence[float] | float | None = None,
    rho: float | None = 0.5,
) -> dict:
    """One flat, JSON-serializable dict of every metric computable from what is given.

    Always (from the task vectors):
      ``num_clients`` K; ``norms`` [||tau_i||] (list); ``norm_mean``; ``norm_cv``
      = spread(norms) (0 when all norms are equal); ``cosine_matrix`` (nested list, K x K);
      ``mean_cosine`` / ``min_cosine`` = mean / min of the off-diagonal cosines (``nan`` for
      K = 1, which has no pair); ``sign_agreement``, ``unanimous_fraction`` and, when
      rho is not None, ``above_rho_fraction`` (see `sign_agreement`, weighted by p_i).
    With ``grads`` (K per-client gradients at theta0, weighted by the same p_i):
      ``grad_diversity``, ``b_dissimilarity``, ``mean_grad_norm``.
    With ``local_steps`` (and optionally ``lrs``): ``steps_cv`` (and ``lr_steps_cv``).

    Note: ``b_dissimilarity`` may be ``inf`` and ``mean_cosine`` ``nan``; ``json.dumps``
    writes those as Infinity / NaN.
    """
    _check(tvs)
    k = len(tvs)
    p = normalized_weights(weights, k)
    g = _gram(tvs)
    norms = [float(v) for v in g.diagonal().clamp_min(0).sqrt()]
    cos = _cosine_from_gram(g)
    off = _off_diagonal(cos)
    report: dict = {
        "num_clients": k,
        "norms": norms,
        "norm_mean": math.fsum(norms) / k,
        "norm_cv": spread(norms),
        "cosine_matrix": cos.tolist(),
        "mean_cosine": float(off.mean()) if off.numel() else math.nan,
        "min_cosine": float(off.min()) if off.numel() else math.nan,
    }
    report.update(sign_agreement(tvs, p, rho))
    if grads is not None:
        if len(grads) != k:
            raise MergeInputError(f"{len(grads)} gradients for {k} task vectors")
        report.update(gradient_dissimilarity(grads, p))
    if local_steps is not None:
        if len(local_steps) != k:
            raise MergeInputError(f"{len(local_steps)} local step counts for {k} task vectors")
        report.update(training_heterogeneity(local_steps, lrs))
    elif lrs is not None:
        raise MergeInputError("lrs given without local_steps")
    return report
