"""A heterogeneity-aware weighting of our own design ("hetero")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.merging import streaming
from fl_merge.merging.blocks import task_vectors_dtype
from fl_merge.merging.registry import Paper, number_param, register
from fl_merge.core.task_vectors import MergeInputError, StateDict


def hetero_coefficients(
    gram: torch.Tensor,
    weights: torch.Tensor,
    normalisers: torch.Tensor | None,
    gamma: float,
    clip: bool,
    floor: float,
) -> torch.Tensor:
    """Per-client coefficients b_i with Delta = sum_i b_i tau_i, from the Gram matrix
    G_ij = <tau_i, tau_j> (float64 [K, K]); see `hetero` for the formula."""
    g = gram.to(torch.float64)
    k = g.shape[0]
    p = weights.to(torch.float64).cpu()
    known = normalisers is not None
    a = normalisers.cpu().double() if known else torch.ones(k, dtype=torch.float64)
    scale = (p * a).sum() if known else torch.tensor(1.0, dtype=torch.float64)
    # u_i = tau_i / a_i, then clip to the median norm: z_i = c_i u_i.
    s = 1.0 / a
    norms = (torch.diagonal(g).clamp_min(0).sqrt()) * s
    if clip:
        r = norms.median()
        c = torch.where(norms > r, r / norms.clamp_min(1e-300), torch.ones_like(norms))
    else:
        c = torch.ones_like(norms)
    d = s * c  # z_i = d_i tau_i
    z = g * d[:, None] * d[None, :]
    zn = torch.diagonal(z).clamp_min(0).sqrt()
    if k == 1:
        cos = torch.ones(1, dtype=torch.float64)
    else:
        cos = torch.zeros(k, dtype=torch.float64)
        for i in range(k):
            o = torch.ones(k, dtype=torch.bool)
            o[i] = False
            po = p[o]
            if float(po.sum()) <= 0:
                cos[i] = 1.0
                continue
            m = po / po.sum()  # leave-one-out consensus weights
            dot = float((z[i, o] * m).sum())
            mnorm2 = float(m @ z[o][:, o] @ m)
            den = float(zn[i]) * max(mnorm2, 0.0) ** 0.5
            cos[i] = dot / den if den > 0 else 0.0
    # max(c, 0)^0 = 1 (torch's 0^0): gamma = 0 keeps p.
    q = p * (cos.clamp(0.0, 1.0).pow(gamma) + floor)
    q = q / q.sum()
    return scale * q * d


def _check_hetero(params: dict) -> None:
    if not number_param(params, "gamma") >= 0:
        raise MergeInputError(f"gamma must be >= 0, got {params['gamma']}")
    if not isinstance(params["clip"], bool):
        raise MergeInputError(f"clip must be true or false, got {params['clip']!r}")
    if not 1e-12 <= number_param(params, "floor") <= 1e12:
        raise MergeInputError(f"floor must lie in [1e-12, 1e12], got {params['floor']}")


def hetero_pass(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
                device: torch.device, params: dict) -> dict:
    """hetero's global statistics (its declared pass, fl_merge/merging/passes.py): ``gram``,
    the float64 K x K Gram matrix G_ij = <tau_i, tau_j> over the whole task vectors, streamed
    in one pass (`streaming.gram`). Everything else hetero reads (weights, normalisers,
    gamma, clip, floor) is given to every merge call alike, so each call forms the same
    coefficients b_i from it (`hetero_coefficients`)."""
    return {"gram": streaming.gram(task_vectors, device, task_vectors_dtype(task_vectors))}


@register(
    "hetero", coordinatewise=False, check_params=_check_hetero,
    global_pass=hetero_pass,  # its Gram matrix: a large-model round merges it by groups
    space={"gamma": (0.5, 1.0, 2.0)},
    formula="normalise by a_i, clip to the median norm, weight by the leave-one-out cosine with "
            "the others plus a floor, rescale by a_eff",
    paper=Paper("ours (this project)"),
)
def hetero(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    normalisers: torch.Tensor | None = None,
    device: torch.device = torch.device("cpu"),
    gamma: float = 1.0,
    clip: bool = True,
    floor: float = 0.01,
    stats: Mapping | None = None,
) -> StateDict:
    """Heterogeneity-aware weighting (ours): normaliser-scaled, norm-clipped,
    agreement-weighted average.

        u_i   = tau_i / a_i        (a_i FedNova's normaliser of client i, see `fednova`;
                                    1 for every client when neither normalisers nor
                                    local steps are known)
        z_i   = min(1, r / ||u_i||) u_i,  r = median_j ||u_j||   (clip=True; lower middle
                                                          value for even K)
        c_i   = cos(z_i, sum_{j!=i} p_j z_j)       (leave-one-out consensus)
        q_i   = p_i (max(c_i, 0)^gamma + floor) / sum_j p_j (max(c_j, 0)^gamma + floor)
        Delta = a_eff * sum_i q_i z_i,   a_eff = sum_i p_i a_i  (1 when a is unknown)

    Motivation: clients differ in (1) how long and with which optimizer they trained: like
    FedNova we divide by a_i so long runs do not dominate, and a_eff restores the step
    scale; (2) how large their update is (learning rate, data size, or a scaled malicious
    update): clipping to the median norm bounds any one client's pull without touching
    typical ones; (3) which direction they pull (non-IID data, conflicting tasks,
    sign-flipped updates): a client whose update points away from the consensus of the
    *others* (it cannot vote for itself) gets less weight, and only the floor's share
    when its cosine is <= 0. gamma sharpens the agreement weighting (gamma = 0 keeps p).
    Identical clients with equal normalisers give back their common vector.

    Continuity: every step is continuous in the task vectors, weights and normalisers
    (wherever the cosines are defined, i.e. no zero update): the floor > 0 keeps the
    normalising sum >= floor, so q varies by O(eps / floor) when the cosines move by eps,
    also when all of them cross 0 (without it q jumped from p_i c_i^gamma / sum to a
    fallback). The floor is the weight share, relative to a fully agreeing client, of a
    client that disagrees.

    Cost: one streamed pass for the K x K Gram matrix (`hetero_pass`, float64 products
    block by block), one for Delta = sum_i b_i tau_i (`streaming.linear_combination`);
    memory one block plus the result. stats (`hetero_pass` on the whole task vectors): its
    Gram matrix is taken, and these task vectors may be any subset of the whole one's
    tensors: exactly those tensors of the whole merge (the same weights and normalisers).
    """
    if stats is None:
        stats = hetero_pass(task_vectors, weights, device, {})
    b = hetero_coefficients(stats["gram"], weights, normalisers, float(gamma), bool(clip),
                            float(floor))
    return streaming.linear_combination(task_vectors, b, device)
