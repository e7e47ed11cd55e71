"""EMR-Merging (Huang et al., NeurIPS 2024): Elect, Mask & Rescale. A personal method: it
returns one model per client (`fl_merge.merging.personal.PersonalDeltas`: one unified vector,
a bool mask and a scale per client), not one shared Delta; a round scores each client on its
own model (docs/methods.md, "Personal methods")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.merging.blocks import task_vectors_dtype
from fl_merge.merging.personal import PersonalDeltas
from fl_merge.merging.registry import Paper, register
from fl_merge.core.task_vectors import StateDict


@register(
    "emr", coordinatewise=False, personal=True, lambda_scale="delta", per_tensor_exact=False,
    formula="tau_uni = s * max_{i: s tau_i > 0} abs(tau_i), s = sign(sum_i tau_i) (0 -> -1); "
            "client i: Delta_i = lambda_i m_i tau_uni, m_i = [tau_i tau_uni > 0], lambda_i = "
            "sum_t mean abs(tau_i^t) / sum_t mean abs(m_i^t tau_uni^t) (one model per client)",
    paper=Paper("Huang et al., NeurIPS 2024, \"EMR-Merging: Tuning-Free High-Performance Model "
                "Merging\"",
                code="harveyhuang18/EMR_Merging, merge_vit/src/main_emr_merging.py (emr_merge); "
                     "FusionBench's emr_merging"),
)
def emr(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
        device: torch.device = torch.device("cpu")) -> PersonalDeltas:
    """EMR-Merging: one unified task vector, and per client a mask and a rescaler.

    Huang et al. (NeurIPS 2024), Sec. 3.2, for tasks i = 1..K and every coordinate:
    1. Elect: s = sign(sum_i tau_i); the unified magnitude is the largest |tau_i| among the
       tasks that agree with s, eps = max_{i: s tau_i > 0} |tau_i| (0 where none does), and
       tau_uni = s * eps.
    2. Mask: m_i = [tau_i * tau_uni > 0] (task i's sign agrees with the unified one).
    3. Rescale: lambda_i = sum |tau_i| / sum |m_i * tau_uni|, so that client i's modulated
       vector lambda_i m_i ⊙ tau_uni has tau_i's mean magnitude.
    Client i's model is theta0 + lambda_i m_i ⊙ tau_uni: Delta_i = lambda_i m_i ⊙ tau_uni,
    and a round scores it at theta0 + eta * Delta_i (lambda_scale "delta": eta = lambda, the
    paper's model at eta 1).

    Conventions of the authors' code (harveyhuang18/EMR_Merging, emr_merge in
    merge_vit/src/main_emr_merging.py and merge_lm's emr_merging; FusionBench's emr_merging
    is the same), followed here:
    - the elected sign is (mean_i tau_i > 0) * 2 - 1: a sum of exactly 0 elects the NEGATIVE
      sign (the tasks with tau_i < 0 there then set eps and keep their mask);
    - the rescaler is a ratio of sums over tensors of per-tensor MEAN magnitudes,
      lambda_i = sum_t mean|tau_i^t| / sum_t mean|m_i^t tau_uni^t| (not of whole-vector
      sums: each tensor counts by its mean, whatever its size). Zero-size tensors add nothing
      (the authors' torch.mean would make them NaN).
    Ours: where nothing of tau_uni survives client i's mask (every tau_i disagrees with the
    elected sign, or tau_i = 0) the authors divide by 0; here lambda_i = 0 and client i's
    model is theta0 (it has nothing to rescale). Client weights: none (each client gets its
    own model; the vote is the plain sum, as in the paper); `merge` refuses unequal ones.
    K = 1: s = sign(tau_1), m_1 = [tau_1 != 0], lambda_1 = 1: the client's own model exactly.
    Tuning-free: no knob is searched; a round searches only the global eta (its lambda grid,
    the paper's point 1.0 included), on validation like every other method.
    Memory: the unified vector, K bool masks (one byte per coordinate each) and, per
    tensor, a few temporaries (K copies of it only when a cast or a device move is needed); arithmetic in float32 at least on `device`, the sign's sum and
    the mean magnitudes in float64 (values near the dtype's maximum stay finite).
    """
    ref = task_vectors[0]
    dtype = task_vectors_dtype(task_vectors)
    k = len(task_vectors)
    scales = torch.zeros(k, dtype=torch.float64)
    kept = torch.zeros(k, dtype=torch.float64)
    unified: StateDict = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    for key, r in ref.items():
        taus = [tv[key].to(device=device, dtype=dtype) for tv in task_vectors]
        total = torch.zeros(r.shape, dtype=torch.float64, device=device)  # no overflow near the max
        for t in taus:
            total.add_(t)
        sign = torch.where(total > 0, 1.0, -1.0).to(dtype)
        del total
        eps = torch.zeros(r.shape, dtype=dtype, device=device)
        for i, t in enumerate(taus):
            agree = t * sign > 0
            masks[i][key] = agree.cpu()
            torch.maximum(eps, torch.where(agree, t.abs(), 0.0), out=eps)
            if t.numel():
                scales[i] += float(t.abs().mean(dtype=torch.float64))
        uni = eps.mul_(sign)
        if r.numel():
            for i in range(k):
                kept[i] += float(torch.where(masks[i][key].to(device), uni.abs(), 0.0).mean(dtype=torch.float64))
        unified[key] = uni.to(device="cpu", dtype=r.dtype)
    rescale = [float(s / c) if c > 0 else 0.0 for s, c in zip(scales.tolist(), kept.tolist())]
    return PersonalDeltas(unified, masks, rescale, [str(i) for i in range(k)])
