"""Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces"): per weight matrix, Task Arithmetic's sum with its
singular spectrum flattened to its mean. Helpers here are shared with iso_cts.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.merging.matrices import live_clients, merge_per_matrix, numerical_rank_mask, weighted_mean
from fl_merge.merging.registry import Paper, register
from fl_merge.core.task_vectors import StateDict

PAPER = Paper(
    "Marczak et al., ICML 2025, \"No Task Left Behind: Isotropic Model Merging with Common "
    "and Task-Specific Subspaces\"",
    code="danielm1405/iso-merging, src/utils/iso.py (iso_c, iso_cts); alpha grid 0.1..3.0 "
         "in src/eval/eval.py",
)


def flat_spectrum(m: torch.Tensor) -> torch.Tensor:
    """U_r diag(mean(s_1..s_r)) V_r^T from the thin SVD m = U S V^T, r = the numerical rank
    of m (singular values above s_max * max(shape) * eps, numpy's matrix_rank rule)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = int(numerical_rank_mask(s, m.shape).sum())
    if r == 0:
        return torch.zeros_like(m)
    return s[:r].mean() * (u[:, :r] @ vh[:r])


@register(
    "iso_c", coordinatewise=False, lambda_scale="delta",
    merges_matrices=True,  # SVD / least squares per 2-D weight; a model without one is refused
    per_tensor_exact=True,  # every tensor is merged on its own
    formula="per 2-D tensor: M = K sum_i p_i tau_i = U S V^T (rank r), Delta = mean(s_1..s_r) "
            "U_r V_r^T; other tensors: sum_i p_i tau_i; lambda = the paper's alpha",
    paper=PAPER,
)
def iso_c(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
) -> StateDict:
    """Iso-C: Task Arithmetic's sum per weight matrix with its singular spectrum made flat.

    Paper (Marczak et al., ICML 2025) and the authors' code (danielm1405/iso-merging,
    src/utils/iso.py, iso_c): per 2-D weight matrix, M = sum_i tau_i = U S V^T and
    Delta = sigma_bar U V^T with sigma_bar the mean singular value; every other tensor
    (biases, norms, convolutions, scalars) is the plain mean (1/K) sum_i tau_i. The merged
    model is theta0 + alpha * Delta: alpha multiplies the method's own merged vector, so
    lambda_scale is "delta" (eta = lambda = alpha) and theta0 + eta * Delta is their model
    at alpha = lambda. They search alpha over 0.1, 0.2, ..., 3.0; fl-merge's lambda grid
    (search.LAMBDAS, 0.05..2.0, shared by all methods) covers it up to 2.0.

    Rank: the mean is over the r nonzero singular values (numerical rank, numpy's rule) and
    Delta is rebuilt from those r directions only. The authors' code averages over all
    min(shape) values and puts that mean on the null-space directions too, which the SVD
    routine picks arbitrarily; for a full-rank M (the usual case) both are the same, for a
    rank-deficient one ours is well defined (the same on every device and library).

    Weights (ours; the authors' code is unweighted): M = K' sum_i p_i tau_i and the other
    tensors are sum_i p_i tau_i, with K' the number of clients of positive weight (a client
    of weight 0 is as if absent). Uniform p gives the authors' sum and mean exactly.
    Work in float32 (float64 stays float64) on `device`; result on CPU in the inputs' dtype.
    """
    live = live_clients(weights)
    return merge_per_matrix(task_vectors, weights, device, lambda key, work: flat_spectrum(
        weighted_mean(task_vectors, weights, key, live, device, work) * len(live)))
