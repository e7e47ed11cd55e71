"""Model Stock (Jang, Yun & Han, ECCV 2024, "Model Stock: All we need is just a few
fine-tuned models"): per-layer interpolation between the average of the fine-tuned models
and the pretrained anchor, from the angle between the fine-tuned models' task vectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.merging import conventions, streaming
from fl_merge.merging.registry import Paper, register
from fl_merge.core.task_vectors import StateDict


def mean_pairwise_cosine(gram: torch.Tensor) -> float:
    """Mean over pairs i < j of cos(tau_i, tau_j) from the Gram matrix G_ij = <tau_i, tau_j>
    (float64 [K, K]). A pair with a zero vector counts as cosine 0 (no shared direction);
    K = 1 gives 1 (a vector's angle to itself). Clamped to [-1, 1] against rounding."""
    g = gram.to(torch.float64).cpu()
    k = g.shape[0]
    if k == 1:
        return 1.0
    norms = torch.diagonal(g).clamp_min(0.0).sqrt()
    den = norms[:, None] * norms[None, :]
    cos = torch.where(den > 0, g / torch.where(den > 0, den, 1.0), torch.zeros_like(g))
    iu = torch.triu_indices(k, k, offset=1)
    return float(cos[iu[0], iu[1]].mean().clamp(-1.0, 1.0))


def model_stock_ratio(cos: float, num_models: int) -> float:
    """Model Stock's interpolation ratio t = N cos / (1 + (N - 1) cos) for N models whose
    task vectors meet at angle arccos(cos) (Jang et al. 2024, Eq. 2), with cos clamped to
    [0, 1] first (ours: the paper's geometry assumes cos > 0; below 0 the formula gives a
    negative t, a step against the models' own average, and it diverges at
    cos = -1/(N - 1)). So t lies in [0, 1]: 0 at orthogonal or opposed updates (keep theta0),
    1 at identical directions (the plain average)."""
    c = min(max(float(cos), 0.0), 1.0)
    n = int(num_models)
    den = 1.0 + (n - 1) * c
    return n * c / den if den > 0 else 0.0


def mergekit_ratio(gram: torch.Tensor, num_models: int) -> float:
    """Model Stock's t as mergekit 0.1.5 computes it (merge_methods/model_stock.py): the mean
    pairwise cosine c with each norm product clamped to >= 1e-6 and c clamped to [-1, 1]
    only, t = N c / (1 + (N - 1) c), and t = 0 where |1 + (N - 1) c| < 1e-6. K = 1 (which
    mergekit refuses) gives t = 1 as ours."""
    g = gram.to(torch.float64).cpu()
    k = g.shape[0]
    if k == 1:
        return 1.0
    norms = torch.diagonal(g).clamp_min(0.0).sqrt()
    cos = (g / (norms[:, None] * norms[None, :]).clamp_min(1e-6)).clamp(-1.0, 1.0)
    iu = torch.triu_indices(k, k, offset=1)
    c = float(cos[iu[0], iu[1]].mean())
    den = 1.0 + (k - 1) * c
    return 0.0 if abs(den) < 1e-6 else k * c / den


@register(
    "model_stock", coordinatewise=False, lambda_scale="delta", check_params=conventions.check_convention,
    per_tensor_exact=True,  # its angle is per tensor by definition
    formula="per tensor l: t_l sum_i p_i tau_i,l, t_l = K c_l / (1 + (K - 1) c_l), c_l the mean "
            "pairwise cosine of tensor l clamped to [0, 1] (K > 2: mean over the pairs, ours); "
            "lambda = eta, 1 is the paper's model; convention=mergekit: c not clamped below 0",
    paper=Paper("Jang, Yun & Han, ECCV 2024, \"Model Stock: All we need is just a few "
                "fine-tuned models\""),
)
def model_stock(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    convention: str = "fl-merge",
) -> StateDict:
    """Delta_l = t_l * sum_i p_i tau_i,l per tensor l, t_l = N c_l / (1 + (N - 1) c_l) with
    c_l the mean pairwise cosine of the task vectors' tensor l (Model Stock, Jang, Yun &
    Han, ECCV 2024, "Model Stock: All we need is just a few fine-tuned models", Eq. 2-3).

    The paper's merged layer is t * mean_i theta_i + (1 - t) * theta0 = theta0 + t * mean_i
    tau_i: our Delta at eta = 1 (uniform p_i). Model Stock has no scale of its own, so its
    lambda multiplies this Delta (lambda_scale "delta": eta = lambda) and lambda = eta = 1
    is the paper's model; the validation search over lambda is ours on top.

    N = K, the number of fine-tuned models. The paper derives t for N models at a common
    pairwise angle and computes it from two; for K > 2 we take c_l as the mean of the
    K(K-1)/2 pairwise cosines of tensor l (unweighted: the paper's models are exchangeable;
    with uniform p_i the average is the paper's). A pair with a zero tensor counts as
    cosine 0; c_l <= 0 gives t_l = 0 (that tensor stays at theta0, see
    `model_stock_ratio`); K = 1 gives t = 1 (the model itself). "Layer" is each parameter
    tensor (weight and bias apart), as in the authors' code.

    Cost: one streamed pass for the per-tensor K x K Gram matrices (float64), one for the
    weighted sums; memory one block plus the result.

    convention="mergekit" (mergekit 0.1.5's "model_stock", filter_wise: false): t from
    `mergekit_ratio`, i.e. the cosine is not clamped to [0, 1], so opposed updates give a
    negative t (a step against the average; singular denominator: t = 0), and a pair whose
    norm product is below 1e-6 has its cosine shrunk rather than set to 0. mergekit has no
    weights (uniform p_i is its average) and no lambda (ours at lambda = 1), computes t in
    the tensors' dtype (we use float64) and writes t mean_i theta_i + (1 - t) theta0 where
    we write theta0 + t mean_i tau_i: equal up to rounding. Its filter_wise: true (one t
    per output row) has no fl-merge counterpart.
    """
    ratio_fn = mergekit_ratio if convention == "mergekit" else (
        lambda gram, n: model_stock_ratio(mean_pairwise_cosine(gram), n))
    ref = task_vectors[0]
    k = len(task_vectors)
    out: dict[str, torch.Tensor] = {}
    p = weights.to(torch.float64).cpu()
    for work in {streaming.work_dtype(r.dtype) for r in ref.values()}:
        keys = [key for key, r in ref.items() if streaming.work_dtype(r.dtype) == work]
        grams = {key: torch.zeros(k, k, dtype=torch.float64, device=device) for key in keys}
        for key, _, _, x, _ in streaming.iter_blocks(task_vectors, device, work, keys=keys):
            xd = x.double()
            grams[key] += xd @ xd.T
        flat = {key: torch.zeros(ref[key].numel(), dtype=work, device=device) for key in keys}
        coef = {key: (ratio_fn(grams[key], k) * p)
                .to(device=device, dtype=work) for key in keys}
        for key, s, e, x, _ in streaming.iter_blocks(task_vectors, device, work, keys=keys):
            torch.mv(x.T, coef[key], out=flat[key][s:e])
        out.update(streaming.to_output(flat, {key: ref[key] for key in keys}))
    return {key: out[key] for key in ref}
