"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"): per linear layer, the weight that best reproduces every client's layer outputs on
that client's own inputs, solved in closed form from the clients' Gram matrices of those
inputs; every other tensor is the mean. The clients send their Grams (extra "gram")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging.matrices import live_clients, weighted_mean
from fl_merge.merging.registry import GRAM, Needs, Paper, number_param, register
from fl_merge.merging.streaming import work_dtype


def _check(params: dict) -> None:
    if not 0.0 <= number_param(params, "alpha") <= 1.0:
        raise MergeInputError(f"alpha must lie in [0, 1], got {params['alpha']}")
    if not 0.0 <= number_param(params, "ridge") <= 1.0:
        raise MergeInputError(f"ridge must lie in [0, 1], got {params['ridge']}")


def scaled_gram(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """G~ = alpha G + (1 - alpha) diag(G): the off-diagonal entries times alpha (the authors'
    reduce_non_diag), of the symmetrised G (a float32 X^T X is symmetric up to rounding)."""
    g = (g + g.T) / 2
    return alpha * g + (1.0 - alpha) * torch.diag(g.diagonal())


def regmean_matrix(taus: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], p: Sequence[float],
                   alpha: float, ridge: float, key: str = "") -> torch.Tensor:
    """Delta_W = (sum_i p_i tau_i G~_i + r M)(sum_i p_i G~_i + r I)^-1 for one weight [d_out,
    d_in], with M = sum_i p_i tau_i and r = ridge * mean(diag(sum_i p_i G~_i)) (1 for an
    all-zero sum): float64 on the tensors' device."""
    if taus[0].numel() == 0:  # an empty side: nothing to solve
        return torch.zeros(taus[0].shape, dtype=torch.float64, device=taus[0].device)
    s = b = m = None
    for tau, g, w in zip(taus, grams, p):
        tau, gt = tau.double(), scaled_gram(g.double(), alpha)
        s = w * gt if s is None else s.add_(gt, alpha=w)
        b = w * (tau @ gt) if b is None else b.add_(tau @ gt, alpha=w)
        m = w * tau if m is None else m.add_(tau, alpha=w)
    scale = float(s.diagonal().mean())
    r = ridge * (scale if scale > 0 else 1.0)
    a = s + r * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    rhs = b + r * m
    try:  # A symmetric: Delta^T = A^-1 rhs^T
        return torch.linalg.solve(a, rhs.T).T
    except RuntimeError:  # torch.linalg.LinAlgError (exactly singular: ridge 0)
        raise MergeInputError(
            f"the clients' summed Gram matrix of '{key}' is singular (an input feature no client "
            "ever activates, or fewer input rows than d_in at alpha=1); use ridge > 0") from None


@register(
    "regmean", coordinatewise=False, needs=Needs(extras=("gram",), layouts={"gram": GRAM}),
    merges_matrices=True,  # SVD / least squares per 2-D weight; a model without one is refused
    check_params=_check, lambda_scale="delta",
    per_tensor_exact=True,  # every linear layer is solved on its own
    # alpha: the authors' configs use 0.1 (most) and 0.9 (DeBERTa NER); 1 is plain RegMean
    space={"alpha": (0.1, 0.5, 0.9)},
    formula="per linear weight with Grams G_i: (sum_i p_i tau_i G~_i)(sum_i p_i G~_i)^-1, "
            "G~ = alpha G + (1 - alpha) diag(G) (ridge r toward sum_i p_i tau_i); other tensors "
            "sum_i p_i tau_i; lambda = eta, 1 is the paper's model",
    paper=Paper("Jin et al., ICLR 2023, \"Dataless Knowledge Fusion by Merging Weights of "
                "Language Models\"",
                code="bloomberg/dataless-model-merging, src/model_merge/avg_merger.py "
                     "(regmean_mean_params) and local_trainer.py (compute_grams); FusionBench's "
                     "fusion_bench/method/regmean/regmean.py"),
)
def regmean(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    extras: dict,
    device: torch.device = torch.device("cpu"),
    alpha: float = 0.1,
    ridge: float = 1e-6,
) -> StateDict:
    """RegMean: per linear layer, the least-squares fit of every client's outputs.

    Paper (Jin et al., ICLR 2023): for a linear layer with weights W_i [d_out, d_in] and
    client inputs X_i [N_i, d_in], W = argmin_W sum_i ||X_i W^T - X_i W_i^T||^2, solved in
    closed form as W = (sum_i W_i G_i)(sum_i G_i)^-1 with the Gram matrices G_i = X_i^T X_i
    (``extras={"gram": [dict per client]}``, keyed by the weight's task-vector key, each
    [d_in, d_in]). theta0 cancels: with W_i = W0 + tau_i,
    Delta_W = (sum_i tau_i G~_i)(sum_i G~_i)^-1, which is what this returns; every other
    tensor (biases, convolutions, norms, embeddings, and 2-D weights without a Gram) is the
    mean sum_i p_i tau_i, as in the authors' code. The merged model theta0 + Delta is the
    paper's: lambda_scale "delta" (eta = lambda, 1 = the paper).

    alpha: the paper's scaling of the Grams' off-diagonal entries, G~ = alpha G + (1 - alpha)
    diag(G) (authors' reduce_non_diag; alpha = 1 is plain RegMean, 0 a per-input-feature
    weighted mean). 0.1 is the value of most of the authors' configs; the search tries 0.1,
    0.5, 0.9.

    Client weights p (ours): the Grams enter as p_i G~_i (the authors' code scales them by
    K c_i for model coefficients c_i); uniform p is the paper's unweighted merge. The
    clients' Grams are means over their input rows (X_i^T X_i / N_i, the authors' and
    FusionBench's normalisation), so every client counts alike whatever its data size;
    weighting=num-examples (p_i ~ N_i) gives back the sums X_i^T X_i of the paper's objective.

    Singular sums (ours): the authors invert sum_i G~_i (torch.inverse), which fails or
    blows up where it is singular: an input feature that no client ever activates (a
    zero row and column, e.g. a dead ReLU unit) or, at alpha = 1, fewer input rows than d_in.
    Here A = sum_i p_i G~_i + r I and the right side gets r M, M = sum_i p_i tau_i, with
    r = ridge * mean(diag(sum_i p_i G~_i)): the ridge regression argmin_D sum_i p_i ||X~_i (D - tau_i)^T||^2
    + r ||D - M||^2, which keeps the mean update where no client has inputs and changes a
    well-conditioned solve by about ridge * cond. ridge = 0 is the paper's exact solve (a
    singular sum is then a MergeInputError). K identical clients give back their tau.

    Arithmetic in float64 on `device`; the result in the task vectors' dtype.
    """
    grams = extras["gram"]
    live = live_clients(weights)
    p = [float(weights[i]) for i in live]
    out: StateDict = {}
    for key, ref in task_vectors[0].items():
        if key in grams[0]:
            delta = regmean_matrix([task_vectors[i][key].to(device) for i in live],
                                   [grams[i][key].to(device) for i in live], p, alpha, ridge, key)
        else:
            delta = weighted_mean(task_vectors, weights, key, live, device, work_dtype(ref.dtype))
        out[key] = delta.to(device="cpu", dtype=ref.dtype)
    return out
