"""Byzantine-robust aggregators: coordinate-wise median and trimmed mean, centered clipping,
Krum / Multi-Krum and the geometric median.

Median and trimmed mean are coordinate-wise (blocks ``[K, n]`` from `merge`); the others use
whole-vector norms or distances, computed by streaming blocks with float64 accumulation, so
memory stays at one block plus a couple of model-sized results, never K models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.merging import streaming
from fl_merge.merging.registry import is_integer, number_param, register
from fl_merge.core.task_vectors import MergeInputError, StateDict

# ------------------------------------------------------------------ coordinate-wise


@register("median", coordinatewise=True)
def median(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Delta = coordinate-wise median of tau_1..tau_K (Yin et al., ICML 2018,
    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates").

    Even K: the mean of the two middle values (numpy's rule). Client weights are ignored:
    every client counts once, as in the paper and Flower's `aggregate_median` (a weighted
    median would let one client with a large weight decide alone).
    """
    k = stacked.shape[0]
    mid = [k // 2] if k % 2 else [k // 2 - 1, k // 2]
    rows = streaming.sorted_rows(stacked, mid)
    if k % 2:
        return rows[k // 2].clone()
    # halves first: (a + b) / 2 would overflow for two values near the dtype's maximum
    return torch.mul(rows[k // 2 - 1], 0.5).add_(rows[k // 2], alpha=0.5)


def _trim_count(k: int, beta: float) -> int:
    return int(beta * k)


def _check_beta(params: dict) -> None:
    beta = number_param(params, "beta")
    if not 0.0 <= beta <= 0.5:
        raise MergeInputError(f"beta must lie in [0, 0.5], got {params['beta']}")


def _trimmed_min_clients(k: int, params: dict) -> None:
    t = _trim_count(k, params["beta"])
    if k - 2 * t < 1:
        raise MergeInputError(
            f"beta={params['beta']} drops {t} lowest and {t} highest of {k} values per "
            f"coordinate, leaving none"
        )


@register(
    "trimmed_mean", coordinatewise=True, check_params=_check_beta,
    min_clients=_trimmed_min_clients,
)
def trimmed_mean(stacked: torch.Tensor, weights: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Delta = per coordinate, the mean of tau_1..tau_K after dropping the t = floor(beta*K)
    lowest and t highest values (Yin et al., ICML 2018; scipy/Flower `trim_mean` rule).

    Client weights are ignored (every client counts once), as in the paper and Flower. With
    t = 0 (e.g. beta = 0.1, K < 10) this is the unweighted mean; beta = 0.5 with odd K is
    the median, with even K it drops everything and is refused.
    """
    k = stacked.shape[0]
    t = _trim_count(k, beta)
    if t == 0:
        # sum_i x_i / k as one matrix-vector product (a plain sum could overflow)
        return torch.full((k,), 1.0 / k, dtype=stacked.dtype, device=stacked.device) @ stacked
    keep = list(range(t, k - t))
    rows = streaming.sorted_rows(stacked, keep)
    inv = 1.0 / len(keep)
    out = torch.mul(rows[t], inv)
    for i in keep[1:]:
        out.add_(rows[i], alpha=inv)
    return out


# ------------------------------------------------------------------ whole-vector


def _flat_center(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    center,
    weights: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Flat per-key starting point on `device`: zeros, the weighted mean, the coordinate-wise
    median, or a given state dict."""
    ref = task_vectors[0]
    if isinstance(center, Mapping):
        return {k: center[k].reshape(-1).to(device=device, dtype=dtype).clone() for k in ref}
    out = streaming.empty_like_flat(ref, device, dtype)
    if center == "zero":
        return out
    pw = weights.to(device=device, dtype=dtype)
    for key, s, e, x, _ in streaming.iter_blocks(task_vectors, device, dtype):
        out[key][s:e] = pw @ x if center == "mean" else median(x, pw)
    return out


_CENTERS = ("zero", "mean", "median")


# More iterations than any of these fixed-point methods needs (each is O(K^2) work; a
# typo like iters=1e9 would otherwise hang the merge).
MAX_ITERS = 10_000


def _check_iters(params: dict) -> None:
    it = params["iters"]
    if not is_integer(it) or not 1 <= it <= MAX_ITERS:
        raise MergeInputError(f"iters must be an integer >= 1 (at most {MAX_ITERS}), got {it!r}")


def _check_cclip(params: dict) -> None:
    if not number_param(params, "tau") > 0:
        raise MergeInputError(f"tau (clipping radius) must be > 0, got {params['tau']}")
    _check_iters(params)
    c = params["center"]
    if not isinstance(c, Mapping) and not (isinstance(c, str) and c in _CENTERS):
        raise MergeInputError(f"center must be one of {_CENTERS} or a state dict, got {c!r}")


@register("cclip", coordinatewise=False, check_params=_check_cclip)
def cclip(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    tau: float = 1.0,
    iters: int = 1,
    center="zero",
) -> StateDict:
    """Centered clipping (Karimireddy, He & Jaggi, ICML 2021, "Learning from History for
    Byzantine Robust Optimization"): starting from v = center, repeat `iters` times
        v <- v + sum_i p_i (tau_i - v) * min(1, tau / ||tau_i - v||),
    the norm taken over the whole flattened task vector (all tensors together).

    center: "zero" (the paper's v0 = 0 in one-shot use: the previous aggregate is theta0),
    "mean" (weighted mean), "median" (coordinate-wise median) or a state dict.

    Streaming: every iterate is v = a v0 + sum_j c_j tau_j, so all distances follow from
    the float64 Gram matrix of (tau_1..tau_K, v0), built in one streamed pass; the
    iterations update (a, c) only and a last pass forms v. Two passes over the clients
    whatever `iters` (three with center="median"), memory one block plus the result.
    """
    k = len(task_vectors)
    dtype = _dtype(task_vectors)
    p = weights.to(torch.float64).cpu()
    if isinstance(center, Mapping):
        _check_center(center, task_vectors[0])
    if isinstance(center, Mapping) or center == "median":
        v0 = _flat_center(task_vectors, center, weights, device, dtype)
        g = streaming.gram(task_vectors, device, dtype, also=v0)
        coef = torch.zeros(k + 1, dtype=torch.float64)
        coef[k] = 1.0
    else:
        v0 = None
        g = streaming.gram(task_vectors, device, dtype)
        coef = p.clone() if center == "mean" else torch.zeros(k, dtype=torch.float64)
    for _ in range(int(iters)):
        d = streaming.sq_dist_to_combination(g, coef)[:k].sqrt()
        w = p * torch.where(d > tau, tau / d.clamp_min(1e-300), torch.ones_like(d))
        coef = coef * (1.0 - w.sum())
        coef[:k] += w
    extra = (float(coef[k]), v0) if v0 is not None else None
    return streaming.linear_combination(task_vectors, coef[:k], device, extra=extra)


def _check_center(center: Mapping, ref: Mapping[str, torch.Tensor]) -> None:
    """A state-dict center must match the task vectors: same keys and shapes, finite
    floating-point tensors."""
    from fl_merge.core.task_vectors import all_finite

    if set(center) != set(ref):
        diff = sorted(set(center) ^ set(ref), key=str)
        raise MergeInputError(f"center has different parameters than the task vectors: {diff[:5]}")
    for key, r in ref.items():
        v = center[key]
        if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
            raise MergeInputError(f"center['{key}'] must be a floating-point tensor")
        if tuple(v.shape) != tuple(r.shape):
            raise MergeInputError(
                f"center['{key}'] has shape {tuple(v.shape)}, the task vectors have {tuple(r.shape)}"
            )
        if not all_finite(v):
            raise MergeInputError(f"center['{key}'] contains NaN or Inf")


def _check_f(params: dict) -> None:
    f = params["f"]
    if not is_integer(f) or f < 0:
        raise MergeInputError(f"f (number of Byzantine clients) must be an integer >= 0, got {f}")
    m = params.get("m")
    if m is not None and (not is_integer(m) or m < 1):
        raise MergeInputError(f"m (clients to average) must be an integer >= 1, got {m}")


def _krum_min_clients(k: int, params: dict, name: str = "Krum") -> None:
    f = int(params["f"])
    if k <= 2 * f + 2:
        raise MergeInputError(
            f"{name} with f={f} needs more than 2f+2 = {2 * f + 2} clients, got {k}"
        )
    m = params.get("m")
    if m is not None and m > k - f:
        raise MergeInputError(f"multikrum m={m} exceeds K - f = {k - f}")


def _multikrum_min_clients(k: int, params: dict) -> None:
    _krum_min_clients(k, params, "Multikrum")


def krum_scores(d2: torch.Tensor, f: int) -> torch.Tensor:
    """score_i = sum of the K-f-2 smallest squared distances from tau_i to the others."""
    k = d2.shape[0]
    others = d2 + torch.diag(torch.full((k,), float("inf"), dtype=d2.dtype))
    return others.sort(dim=1).values[:, : k - f - 2].sum(1)


def _select_mean(task_vectors, weights, idx, device) -> StateDict:
    ref = task_vectors[0]
    sel = [task_vectors[i] for i in idx]
    p = weights[idx]
    if float(p.sum()) <= 0:
        raise MergeInputError(
            f"multikrum selected clients {idx}, whose weights are all 0: nothing to average"
        )
    p = p / p.sum()
    dtype = streaming.work_dtype(next(iter(ref.values())).dtype)
    out = streaming.empty_like_flat(ref, device, dtype)
    pw = p.to(device=device, dtype=dtype)
    for key, s, e, x, _ in streaming.iter_blocks(sel, device, dtype):
        out[key][s:e] = pw @ x
    return streaming.to_output(out, ref)


@register("krum", coordinatewise=False, check_params=_check_f, min_clients=_krum_min_clients)
def krum(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    f: int = 1,
) -> StateDict:
    """Delta = tau_{i*},  i* = argmin_i score_i,  score_i = sum of squared distances from
    tau_i to its K-f-2 nearest other task vectors (Krum, Blanchard et al., NeurIPS 2017).

    Needs K > 2f+2. Weights are ignored (selection is by geometry); ties go to the lowest
    client index, so the result is order-dependent only on exact score ties.
    Distances are streamed block by block with float64 accumulation.
    """
    d2 = streaming.sq_distances(task_vectors, device, _dtype(task_vectors))
    best = int(torch.argmin(krum_scores(d2, int(f))))
    return {k: v.detach().clone() for k, v in task_vectors[best].items()}


@register(
    "multikrum", coordinatewise=False, check_params=_check_f, min_clients=_multikrum_min_clients
)
def multikrum(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    f: int = 1,
    m: int | None = None,
) -> StateDict:
    """Delta = sum_{i in S} p_i tau_i / sum_{i in S} p_i with S the m clients of lowest Krum
    score (Multi-Krum, Blanchard et al. 2017; El Mhamdi et al. 2018). m = None means K - f.

    Like Flower's `aggregate_krum(..., to_keep=m)` the selected updates are averaged with
    the client weights. Needs K > 2f+2 and m <= K - f.
    """
    k = len(task_vectors)
    m = k - int(f) if m is None else int(m)
    d2 = streaming.sq_distances(task_vectors, device, _dtype(task_vectors))
    scores = krum_scores(d2, int(f))
    idx = sorted(torch.argsort(scores, stable=True)[:m].tolist())
    return _select_mean(task_vectors, weights, idx, device)


def _dtype(task_vectors) -> torch.dtype:
    return streaming.work_dtype(next(iter(task_vectors[0].values())).dtype)


def _check_gm(params: dict) -> None:
    if not number_param(params, "nu") > 0:
        raise MergeInputError(f"nu (smoothing) must be > 0, got {params['nu']}")
    _check_iters(params)


@register("geometric_median", coordinatewise=False, check_params=_check_gm)
def geometric_median(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    nu: float = 1e-6,
    iters: int = 10,
) -> StateDict:
    """Delta ~= argmin_v sum_i p_i ||v - tau_i|| by the smoothed Weiszfeld algorithm
    (RFA, Pillutla, Kakade & Harchaoui, IEEE TSP 2022): from v = sum p_i tau_i, repeat
        beta_i = p_i / max(nu, ||v - tau_i||),   v <- sum_i beta_i tau_i / sum_i beta_i
    `iters` times, norms over the whole flattened vector.

    Streaming: every iterate is v = sum_j c_j tau_j, so ||v - tau_i||^2 = G_ii - 2(Gc)_i +
    c'Gc from the float64 Gram matrix G (one streamed pass); the iterations run on the K
    coefficients and one more pass forms v: two passes whatever `iters`, memory one block
    plus the result. (Distances below ~1e-7 of the norms are not resolved, i.e. well under
    any useful nu relative to the update size.)
    """
    p = weights.to(torch.float64).cpu()
    g = streaming.gram(task_vectors, device, _dtype(task_vectors))
    c = p.clone()
    for _ in range(int(iters)):
        d = streaming.sq_dist_to_combination(g, c).sqrt()
        beta = p / d.clamp_min(nu)
        c = beta / beta.sum()
    return streaming.linear_combination(task_vectors, c, device)
