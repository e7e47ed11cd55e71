"""WUDI-Merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It:
Guiding Data-Free Model Merging via Task Vectors"): per weight matrix, a merged task vector
found by gradient descent on its interference with every task vector, data-free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging.matrices import is_matrix, live_clients, weighted_mean
from fl_merge.merging.registry import Paper, is_integer, number_param, register
from fl_merge.merging.streaming import work_dtype

OTHERS = ("base", "mean")
# Adam's constants in the authors' code (torch.optim.Adam defaults).
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _check(params: dict) -> None:
    iters = params["iters"]
    if not is_integer(iters) or iters < 0:
        raise MergeInputError(f"iters (Adam steps per matrix) must be an integer >= 0, got {iters!r}")
    lr = number_param(params, "lr")
    if lr <= 0.0:
        raise MergeInputError(f"lr (Adam's step size) must be a number > 0, got {params['lr']!r}")
    if not isinstance(params["others"], str) or params["others"] not in OTHERS:
        raise MergeInputError(f"others (what non-matrix tensors get) must be 'base' (the "
                              f"authors': Delta 0) or 'mean' (FusionBench's), got {params['others']!r}")


def interference_gradient(mats: Sequence[torch.Tensor], coef: Sequence[float],
                          device: torch.device, dtype: torch.dtype):
    """grad(x) of the WUDI loss L(x) = sum_i coef_i ||(x - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2
    over the clients' m x n matrices `mats` (moved to `device` in `dtype` one at a time; a
    zero tau_i adds nothing: its term is 0 whatever x). Returns (grad function, the start
    x0 = sum_i coef_i tau_i).

    grad(x) = 2 sum_i c_i (x - tau_i) tau_i^T tau_i with c_i = coef_i / ||tau_i||^2, in the
    cheaper of two equal forms per matrix. L is quadratic, so when n <= K m:
    grad(x) = 2 (x - x0) A + R with the n x n A = sum_i c_i tau_i^T tau_i and
    R = 2 sum_i c_i ((x0 - tau_i) tau_i^T) tau_i, both accumulated client by client in two
    passes (memory n^2 + 2 m n beside one client's slice; m n^2 flops a step; R is taken
    from the differences x0 - tau_i, as the authors' form, so one client's gradient at its
    start is exactly 0). Else (n > K m, e.g. a 1 x n matrix) the authors' form itself on
    the K stacked slices (memory K m n; 2 K m^2 n flops a step)."""
    m, n = mats[0].shape
    start = torch.zeros(m, n, dtype=dtype, device=device)
    scale = []
    for c, raw in zip(coef, mats):
        t = raw.to(device=device, dtype=dtype)
        start.add_(t, alpha=float(c))
        sq = float(t.square().sum())
        scale.append(2.0 * float(c) / sq if sq > 0.0 else 0.0)
    kept = [(s, raw) for s, raw in zip(scale, mats) if s != 0.0]
    if not kept:  # every tau_i is 0: the loss is 0 everywhere
        return (lambda x: torch.zeros_like(x)), start
    if n <= len(mats) * m:
        a = torch.zeros(n, n, dtype=dtype, device=device)
        r = torch.zeros_like(start)
        for s, raw in kept:
            t = raw.to(device=device, dtype=dtype)
            a.addmm_(t.T, t, alpha=s)
            r.addmm_((start - t) @ t.T, t, alpha=s)
        x0 = start.clone()  # the caller's Adam moves `start` in place
        return (lambda x: torch.addmm(r, x - x0, a)), start
    stack = torch.stack([raw.to(device=device, dtype=dtype) for _, raw in kept])  # [K, m, n]
    cs = torch.tensor([s for s, _ in kept], dtype=dtype, device=device)
    return (lambda x: torch.einsum("k,kij->ij", cs,
                                   (x.unsqueeze(0) - stack) @ stack.transpose(1, 2) @ stack)), start


def adam(x: torch.Tensor, grad, iters: int, lr: float) -> torch.Tensor:
    """`iters` steps of Adam (Kingma & Ba 2015) on x in place, as torch.optim.Adam with its
    defaults (betas 0.9, 0.999, eps 1e-8 added to the bias-corrected sqrt(v), no weight
    decay): m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
    x <- x - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)."""
    m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
    for t in range(1, iters + 1):
        g = grad(x)
        m1.mul_(BETA1).add_(g, alpha=1.0 - BETA1)
        m2.mul_(BETA2).addcmul_(g, g, value=1.0 - BETA2)
        denom = (m2.sqrt() / (1.0 - BETA2 ** t) ** 0.5).add_(EPS)
        x.addcdiv_(m1, denom, value=-lr / (1.0 - BETA1 ** t))
    return x


@register(
    "wudi", coordinatewise=False, check_params=_check, lambda_scale="delta",
    merges_matrices=True,  # SVD / least squares per 2-D weight; a model without one is refused
    per_tensor_exact=True,  # every matrix is optimised on its own; other tensors per tensor
    formula="per 2-D tensor: iters Adam steps (lr) from sum_i c_i tau_i on sum_i c_i "
            "norm((tau_m - tau_i) tau_i^T)^2 / norm(tau_i)^2, c_i = K p_i; other tensors 0 "
            "(others=base, the authors') or sum_i p_i tau_i (mean); lambda = the authors' "
            "scaling coefficient (1 in the paper)",
    paper=Paper("Cheng et al., ICML 2025, \"Whoever Started the Interference Should End It: "
                "Guiding Data-Free Model Merging via Task Vectors\"",
                code="nathanielyvo/WUDI-Merging, vit/wudi_main.py (get_redundant_task_vector); "
                     "FusionBench fusion_bench/method/wudi/wudi.py"),
)
def wudi(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    iters: int = 300,
    lr: float = 1e-5,
    others: str = "base",
) -> StateDict:
    """WUDI: per 2-D tensor, Adam on the interference loss from the sum of the task vectors.

    Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding
    Data-Free Model Merging via Task Vectors" (Sec. 3-4), following the authors' code
    (nathanielyvo/WUDI-Merging, vit/wudi_main.py, get_redundant_task_vector) and FusionBench's
    (tanganke/fusion_bench, fusion_bench/method/wudi/wudi.py). A linear layer's task vector
    spans (approximately) the inputs that layer sees, so interference on task i's inputs is
    measured on tau_i itself. Per m x n weight matrix:

        tau_m = argmin sum_i c_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

    (squared Frobenius norms, summed over the clients, no mean: the authors' loss), found
    by `iters` steps of Adam (lr; betas 0.9, 0.999; eps 1e-8) from tau_m = sum_i c_i tau_i.
    The authors' defaults: 300 steps, lr 1e-5, c_i = 1. The loss is quadratic, so the
    gradient 2 (tau_m A - B) is exact (no autograd; `interference_gradient`).

    Tensors: every 2-D tensor is optimised (FusionBench's rule). The authors' ViT code
    optimises only the blocks' attention and MLP weights and leaves every other tensor at
    the pretrained value (their NLU code excludes embeddings, LayerNorms, biases and the
    classifier): that is others="base" here, Delta = 0 for every tensor that is not 2-D
    (biases, norms, conv kernels, scalars), the default. others="mean" gives them the
    weighted mean sum_i p_i tau_i instead, as FusionBench does. Other 2-D tensors the
    authors skip (CLIP's projection and positional embedding) are optimised here like any
    matrix: exclude them from the merged keys upstream to reproduce the ViT setting.

    Scale (lambda_scale "delta"): the authors apply tau_m with scaling coefficient 1 ("no
    rescaling coefficient", vit/wudi_main.py: scaling_coef=1; their RoBERTa script takes it
    as --alpha), so Delta = tau_m, eta = lambda = their coefficient, and lambda = 1 is the
    paper's model (in the default lambda grid; tau_m starts from a SUM of task vectors, so
    larger lambdas rarely help). No knob is searched: the paper tunes none.

    Weights (ours; the authors' code is unweighted): c_i = K' p_i, K' the clients with
    p_i > 0, so uniform weights are the authors' method and a client of weight 0 is absent
    from the loss and the start. K = 1: the start tau_1 is the minimum (gradient 0), so
    every matrix is tau_1 exactly; with others="base" the other tensors stay 0. K identical
    clients are not given back: the start is K tau, and the loss is 0 wherever
    (tau_m - tau) tau^T = 0, so Adam walks from K tau towards tau only as far as iters * lr
    allows (at most ~3e-3 per entry at the defaults).

    Ours beside: a client whose matrix is all zero adds nothing to the loss (its term is
    0/0 in the authors' code, NaN); the gradient is computed in the cheaper of two equal
    forms (`interference_gradient`). Deterministic: no randomness, one client's tensor (or
    one matrix's K slices) on `device` at a time, float32 (float64 inputs in float64); the
    result is on CPU in the task vectors' dtype.
    """
    p = weights.to(torch.float64).cpu()
    live = live_clients(p)
    coef = [len(live) * float(p[i]) for i in live]
    out: StateDict = {}
    for key, r in task_vectors[0].items():
        work = work_dtype(r.dtype)
        if is_matrix(r):
            grad, x = interference_gradient([task_vectors[i][key] for i in live], coef,
                                            device, work)
            merged = adam(x, grad, int(iters), float(lr))
        elif others == "mean":
            merged = weighted_mean(task_vectors, p, key, live, device, work)
        else:
            merged = torch.zeros(r.shape, dtype=work, device=device)
        out[key] = merged.to(device="cpu", dtype=r.dtype)
    return out
