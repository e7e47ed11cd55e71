"""Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces"): per weight matrix, the top singular directions of Task
Arithmetic's sum (the common subspace) plus each task's top directions outside it (the
task-specific subspaces), orthogonalised together, with a flat spectrum."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging.registry import number_param, register
from fl_merge.merging.matrices import live_clients, merge_per_matrix, polar
from fl_merge.methods.iso_c import PAPER


def _check_fraction(params: dict) -> None:
    f = number_param(params, "common_space_fraction")
    if not 0.0 <= f <= 1.0:
        raise MergeInputError(f"common_space_fraction must lie in [0, 1], got {f}")


def subspace_sizes(rank: int, fraction: float, k: int) -> tuple[int, int]:
    """(common size, directions per task) for a matrix of min(shape) `rank` and k tasks, as
    the authors' code computes them: common = int(rank * fraction); the task-specific total
    rank - common rounded (Python's round) to a multiple of k, per task its k-th part; common
    = rank - k * per task. Ours: per task is capped at rank // k, so that common never goes
    negative (their code fails there; at fraction 0.8 it never does)."""
    common = int(rank * fraction)
    per_task = min(round((rank - common) / k), rank // k)
    return rank - k * per_task, per_task


def iso_cts_matrix(taus: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """Iso-CTS of one weight matrix from the (weight-scaled) task matrices `taus`."""
    k = len(taus)
    rank = min(taus[0].shape)
    common, per_task = subspace_sizes(rank, fraction, k)
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    uc = u[:, :common]
    us, ss, vs = [], [], []
    for tau in taus:
        # the task's component orthogonal to the common subspace (left side, as the authors)
        ut, st, vt = torch.linalg.svd(tau - uc @ (uc.T @ tau), full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vt[:per_task])
    us.append(uc)
    ss.append(s[:common])
    vs.append(vh[:common])
    sigma = torch.cat(ss).mean()  # rank values: k * per_task task-specific + common
    return sigma * (polar(torch.cat(us, dim=1)) @ polar(torch.cat(vs, dim=0)))


@register(
    "iso_cts", coordinatewise=False, lambda_scale="delta", check_params=_check_fraction,
    merges_matrices=True,  # SVD / least squares per 2-D weight; a model without one is refused
    per_tensor_exact=True,  # every tensor is merged on its own
    formula="per 2-D tensor: common subspace = top k = int(f min(shape)) singular vectors of "
            "M = K sum_i p_i tau_i, plus each K p_i tau_i's top (min(shape) - k)/K outside it; "
            "U, V orthogonalised (polar factor), spectrum = mean of the kept singular values; "
            "other tensors: sum_i p_i tau_i; lambda = the paper's alpha",
    paper=PAPER,
)
def iso_cts(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    common_space_fraction: float = 0.8,
) -> StateDict:
    """Iso-CTS: a flat spectrum over the common and the task-specific subspaces.

    As the authors' code does it (danielm1405/iso-merging, src/utils/iso.py, iso_cts), per
    2-D weight matrix of r = min(shape):
    1. M = sum_i tau_i = U S V^T; the common subspace is its top c singular triplets,
       c = int(r * f) adjusted so that r - c splits evenly into K parts of d (see
       `subspace_sizes`; f = common_space_fraction, 0.8 in their configs);
    2. per task, tau_i - U_c U_c^T tau_i = U_i S_i V_i^T and its top d triplets;
    3. the K * d task-specific and c common left vectors side by side, U*, and the right
       ones stacked, V*, are each replaced by their orthonormal polar factor (P Q^T from
       their SVD), and the spectrum by the mean sigma of the r kept singular values (the
       task-specific S_i's top d and S's top c);
    4. Delta = sigma U* V*^T.
    Every other tensor is the plain mean (1/K) sum_i tau_i (their code's running mean).
    The merged model is theta0 + alpha * Delta: alpha multiplies the method's own merged
    vector, so lambda_scale is "delta" (eta = lambda = alpha) and theta0 + eta * Delta is their
    model at alpha = lambda. They search alpha over 0.1..3.0 and keep f = 0.8 fixed, so f is
    not searched here; fl-merge's shared lambda grid (search.LAMBDAS) covers alpha up to 2.0.

    Where we differ: the paper speaks of rank, the code (and this) of min(shape); d is capped
    at r // K where their code would make c negative (f near 0 only). A rank-deficient
    tau_i or M leaves some chosen directions to the SVD routine, as in their code.
    Weights (ours; their code is unweighted): the task matrices are K' p_i tau_i, K' the
    number of clients of positive weight (a client of weight 0 is as if absent), so
    M = K' sum_i p_i tau_i and a client's task-specific singular values scale with its
    weight (its directions do not); other tensors are sum_i p_i tau_i. Uniform p gives their
    merge exactly. Work in float32 (float64 stays float64) on `device`; result on CPU in the
    inputs' dtype.
    Memory: the K task matrices of one tensor at a time (K x the largest matrix) on `device`.
    """
    fraction = float(common_space_fraction)
    live = live_clients(weights)

    def matrix(key: str, work: torch.dtype) -> torch.Tensor:
        taus = [task_vectors[i][key].to(device=device, dtype=work) * (len(live) * float(weights[i]))
                for i in live]
        return iso_cts_matrix(taus, fraction)

    return merge_per_matrix(task_vectors, weights, device, matrix)
