"""DELLA-Merging (Deep et al. 2024): magnitude-ranked random drop (MagPrune), rescale, then
a sign-elected disjoint mean (or a plain weighted sum: della_linear), as mergekit 0.1.5
defines it. Everything is per tensor (ranks per row, rescale per tensor) or per coordinate
(sign election), so `fl-merge merge`'s per-tensor run is the method itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging import streaming
from fl_merge.merging.blocks import task_vectors_dtype
from fl_merge.merging.registry import Paper, is_integer, number_param, register
from fl_merge.methods.dare import dare_seed


def _normalizes(params: dict) -> bool:
    """mergekit's `normalize`: given, or its default (della: true, della_linear: false)."""
    return (not params["linear"]) if params["normalize"] is None else bool(params["normalize"])


def _check(params: dict) -> None:
    d, eps = number_param(params, "density"), number_param(params, "epsilon")
    if not 0.0 < d <= 1.0:
        raise MergeInputError(f"density must lie in (0, 1], got {params['density']}")
    if eps < 0.0:
        raise MergeInputError(f"epsilon must be >= 0, got {params['epsilon']}")
    if d < 1.0 and not (0.0 < d - eps and d + eps < 1.0):
        raise MergeInputError(f"epsilon must keep density +/- epsilon inside (0, 1), got "
                              f"density={params['density']}, epsilon={params['epsilon']}")
    if not is_integer(params["seed"]):
        raise MergeInputError(f"seed must be an integer, got {params['seed']!r}")
    for name in ("linear", "rescale"):
        if not isinstance(params[name], bool):
            raise MergeInputError(f"{name} must be true or false, got {params[name]!r}")
    if params["normalize"] is not None and not isinstance(params["normalize"], bool):
        raise MergeInputError(f"normalize must be true, false or null (mergekit's default), "
                              f"got {params['normalize']!r}")


def magprune(x: torch.Tensor, density: float, epsilon: float, rescale: bool,
             generator: torch.Generator) -> torch.Tensor:
    """mergekit's della_magprune on one client's tensor x (any shape, float32/64).

    Rows are x itself for ndim >= 2 (ranked along dim 1, as mergekit's argsort(dim=1)),
    else one row. Rank r = 1..n of |x| within a row (ascending; ties in stable order),
    p = (density - epsilon) + 2 epsilon (r - 1) / (n - 1), keep ~ Bernoulli(p) from the CPU
    `generator`; rescale: multiply the kept entries by ||x||_1 / ||kept||_1 unless either
    is below 1e-7. A row of one entry gets p = density (mergekit fails there: 0/0)."""
    if density >= 1.0 or x.numel() == 0:
        return x
    rows = x if x.dim() >= 2 else x.reshape(1, -1)
    n = rows.shape[1]
    mag = rows.abs().cpu()
    ranks = torch.argsort(torch.argsort(mag, dim=1, stable=True), dim=1).to(x.dtype) + 1
    if n > 1:
        rank_norm = ((ranks - 1) / (n - 1)).clamp(0, 1)
    else:
        rank_norm = torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    keep = torch.bernoulli(probs, generator=generator).to(device=x.device, dtype=x.dtype)
    masked = (rows * keep).reshape(x.shape)
    if not rescale:
        return masked
    before, after = x.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


@register(
    "della", coordinatewise=False, check_params=_check,
    lambda_scale=lambda params: "delta" if _normalizes(params) else "sum",
    per_tensor_exact=True,  # ranks per row, rescale per tensor, masks seeded per tensor
    space={"density": (0.3, 0.5, 0.7)},
    formula="per tensor: keep tau_i entries ~ Bernoulli(density - eps + 2 eps rank/(n - 1)), "
            "ranks of abs(tau_i) per row, rescale to tau_i's L1 norm; elect s = sign(sum_i p_i "
            "d_i) (0 -> +), mean over the agreeing clients (linear: sum_i p_i d_i)",
    paper=Paper("Deep et al. 2024, \"DELLA-Merging: Reducing Interference in Model Merging "
                "through Magnitude-Based Sampling\" (arXiv:2406.11617)",
                code="arcee-ai/mergekit 0.1.5, mergekit/sparsify.py (della_magprune) and "
                     "merge_methods/generalized_task_arithmetic.py (della, della_linear)"),
)
def della(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    names: Sequence[str] | None = None,
    device: torch.device = torch.device("cpu"),
    density: float = 1.0,
    epsilon: float = 0.15,
    seed: int = 0,
    linear: bool = False,
    normalize: bool | None = None,
    rescale: bool = True,
) -> StateDict:
    """DELLA-Merging (Deep et al. 2024, arXiv:2406.11617) as mergekit 0.1.5 computes it
    (mergekit/sparsify.py della_magprune; merge_methods/generalized_task_arithmetic.py,
    methods della and della_linear).

    1. MagPrune, per client and tensor (`magprune`): rank |tau_i| within each row (dim 1
       of a matrix or higher, the whole tensor if 1-D), keep an entry with probability
       p = density - epsilon + 2 epsilon (rank - 1)/(n - 1) (the largest entries most
       likely), and with rescale multiply what is kept by ||tau_i||_1 / ||kept||_1 (one
       factor per tensor, as mergekit; the paper's 1/p per entry is not what mergekit
       does) -> d_i. density >= 1 keeps tau_i unchanged.
    2. linear=False (mergekit's della): s = +1 where sum_i p_i d_i >= 0 else -1, A = {i :
       sign(d_i) = s} (a zero entry agrees with no sign); normalize: Delta = sum_{i in A}
       p_i d_i / sum_{i in A} p_i (0 where A is empty), else Delta = sum_{i in A} p_i d_i.
       linear=True (mergekit's della_linear): Delta = sum_i p_i d_i.

    Lambda: mergekit's model is theta0 + lambda * sum_{i in A} w_i d_i, divided by
    sum_{i in A} w_i when normalize (default for della) and by sum_i w_i for della_linear
    with normalize. Our p_i = w_i / sum_j w_j, so with normalize eta = lambda (lambda_scale
    "delta", eta = 1 is mergekit's lambda 1), without it eta = lambda * sum_i w_i, i.e.
    K * lambda at mergekit's weight 1 per model (lambda_scale "sum"; della_linear's
    default). normalize=None is mergekit's default for the variant.

    Ours, on purpose: the Bernoulli draws come from a CPU torch.Generator seeded by
    (seed, client name, tensor name) (`dare.dare_seed`, as DARE), not mergekit's global
    RNG: reproducible, independent of client order and of the tensor order, hence exact
    per tensor; so the same seed does not give mergekit's masks (parity only where
    mergekit is deterministic, density 1). Ties in |tau| rank in stable order; a row of
    one entry (a [n, 1] matrix, a scalar) gets p = density where mergekit fails (0/0);
    epsilon < 0 (which would favour small entries) is refused. The space (density 0.3,
    0.5, 0.7 at epsilon 0.15) is ours; mergekit's default density 1 prunes nothing.
    Memory: the K clients' versions of one tensor at a time.
    """
    ref = task_vectors[0]
    dtype = task_vectors_dtype(task_vectors)
    names = [f"client {i}" for i in range(len(task_vectors))] if names is None else list(names)
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise MergeInputError(f"della keys its random masks by client name: names must be "
                              f"unique, got {dup!r} twice")
    norm = _normalizes({"linear": linear, "normalize": normalize})
    p = weights.to(device=device, dtype=dtype)
    out = {}
    for key, r in ref.items():
        d = []
        for i, tv in enumerate(task_vectors):
            g = torch.Generator().manual_seed(dare_seed(seed, names[i], key))
            x = tv[key].to(device=device, dtype=dtype)
            d.append(magprune(x, float(density), float(epsilon), rescale, g).reshape(-1))
        wd = torch.stack(d) * p[:, None]
        if linear:
            num, den = wd.sum(0), p.sum().expand(wd.shape[1:])
        else:
            elected = torch.where(wd.sum(0) >= 0, 1.0, -1.0).to(dtype)
            agree = (torch.sign(wd) == elected).to(dtype)
            num, den = (wd * agree).sum(0), (p[:, None] * agree).sum(0)
        out[key] = num / torch.where(den == 0, 1.0, den) if norm else num
    return streaming.to_output(out, ref)
