"""TSV-M, Task Singular Vectors Merging (Gargiulo et al., CVPR 2025, "Task Singular Vectors:
Reducing Task Interference in Model Merging"): per weight matrix, keep each task's top
singular components, stack them, decorrelate the stacked singular vectors and rebuild."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import StateDict
from fl_merge.merging.matrices import merge_per_matrix, partial_isometry
from fl_merge.merging.registry import Paper, register


def tsv_matrix(mats: Sequence[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """TSV-M of one m x n matrix over K clients (work dtype, on the matrices' device):
    tau_i = U_i S_i V_i^T, keep the top k = floor(min(m, n) / K) triplets of each, singular
    values times scale_i; stack U_hat = [U_1,k .. U_K,k] (m x Kk), V_hat likewise (n x Kk);
    return polar(U_hat) diag(s_hat) polar(V_hat)^T. k = 0 (K > min(m, n)) gives 0, as the
    authors' code (every slot left zero)."""
    m, n = mats[0].shape
    k = min(m, n) // len(mats)
    if k == 0:
        return torch.zeros_like(mats[0])
    us, ss, vhs = [], [], []
    for i, x in enumerate(mats):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k] * scale[i])
        vhs.append(vh[:k, :])
    u_perp = partial_isometry(torch.cat(us, dim=1))   # [m, Kk]
    vh_perp = partial_isometry(torch.cat(vhs, dim=0))  # [Kk, n]
    return (u_perp * torch.cat(ss)[None, :]) @ vh_perp


@register(
    "tsv_m", coordinatewise=False, lambda_scale="delta",
    merges_matrices=True,  # SVD / least squares per 2-D weight; a model without one is refused
    per_tensor_exact=True,  # every matrix is merged on its own, every other tensor averaged
    formula="per 2-D tensor: top floor(r/K) SVD triplets of each tau_i (singular values times "
            "p_i / mean p), stacked U and V orthogonalised (P Q^T of their SVD), "
            "U_perp diag(s) V_perp^T; other tensors sum_i p_i tau_i; lambda = the authors' alpha",
    paper=Paper("Gargiulo et al., CVPR 2025, \"Task Singular Vectors: Reducing Task "
                "Interference in Model Merging\"",
                code="AntoAndGar/task_singular_vectors, src/utils/TSVM_utils.py "
                     "(compute_and_sum_svd_mem_reduction)"),
)
def tsv_m(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
) -> StateDict:
    """TSV-M: per 2-D tensor U_perp diag(s_hat) V_perp^T from each client's top
    floor(r/K) singular triplets; every other tensor the weighted mean.

    Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model
    Merging" (Sec. 4, TSV-M), following the authors' code (AntoAndGar/task_singular_vectors,
    src/utils/TSVM_utils.py, compute_and_sum_svd_mem_reduction). For an m x n tensor,
    r = min(m, n), k = floor(r / K) (floor as the authors' code: the K*k..r slots stay 0;
    K > r leaves that matrix at 0):

    1. tau_i = U_i diag(S_i) V_i^T (thin SVD); keep U_i[:, :k], S_i[:k], V_i[:, :k];
    2. U_hat = [U_1,k .. U_K,k], V_hat likewise, s_hat = [S_1,k .. S_K,k];
    3. U_perp = P Q^T from the SVD U_hat = P Sigma Q^T, V_perp likewise (the authors'
       orthogonalisation; see `partial_isometry` (fl_merge/merging/matrices.py) for the rank-deficient case, where theirs
       is not unique and we drop the null-space pairs: identical clients then give tau's
       top-k truncation);
    4. M = U_perp diag(s_hat) V_perp^T.

    Every tensor that is not 2-D (biases, norms, conv kernels, scalars) is the plain mean
    of the clients' tensors, as in the authors' code (their exclusion of CLIP's 2-D
    "text_projection", averaged too, is model-specific and not reproduced).

    Scale: the authors' merged model is theta0 + alpha * M, with alpha tuned on validation
    over 0.1, 0.2, .., 3.0 (their src/eval/eval.py, 30 points). M is their own merged vector (its matrix part a sum of K
    rank-k pieces, its other tensors a mean), so lambda_scale is "delta": Delta = M,
    eta = lambda = alpha, and theta0 + eta * Delta is their model at alpha = lambda. TSV-M
    has no knob of its own (k is fixed by K), so its search space is lambda alone, in
    alpha's units (the default lambda grid stops at 2; give theirs with `lambdas`).

    Weights (ours: the authors' code is unweighted): client i's kept singular values are
    multiplied by c_i = p_i / mean(p) = K p_i, and other tensors take sum_i p_i tau_i. For
    p_i > 0 this is exactly the authors' TSV-M run on the rescaled task vectors K p_i tau_i
    (same singular vectors, singular values times K p_i, whose mean is sum_i p_i tau_i);
    uniform p gives c_i = 1, the authors' method. A client with p_i = 0 still holds its k
    slots (its directions shape the orthogonalisation) but adds no singular value.

    Computed on `device` in float32 (float64 inputs in float64); the result is on CPU in the
    task vectors' dtype. Cost per matrix: K thin SVDs plus two of the m x Kk / Kk x n stacks.
    """
    p = weights.to(torch.float64).cpu()
    scale = p / p.mean()
    return merge_per_matrix(task_vectors, weights, device, lambda key, work: tsv_matrix(
        [tv[key].to(device=device, dtype=work) for tv in task_vectors], scale.to(device=device, dtype=work)))
