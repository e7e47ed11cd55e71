"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017): the task vector(s) closest to
their neighbours. Whole-vector: squared distances streamed with float64 accumulation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging import streaming
from fl_merge.merging.blocks import task_vectors_dtype
from fl_merge.merging.registry import Derived, Paper, is_integer, register


def krum_fs(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[int]:
    """Every Byzantine count f that Krum can run with on K clients (K > 2f + 2)."""
    return list(range(0, (len(task_vectors) - 3) // 2 + 1))


KRUM_SPACE = {"f": Derived(krum_fs, "0..(K-3)//2")}


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


def krum_pass(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
              device: torch.device, params: dict) -> dict:
    """Krum's global statistics (its declared pass, fl_merge/merging/passes.py):
    ``sq_distances`` the [K, K] float64 squared distances of the whole task vectors (one
    streamed pass) and ``selected`` = [i*], the client they choose."""
    d2 = streaming.sq_distances(task_vectors, device, task_vectors_dtype(task_vectors))
    return {"sq_distances": d2, "selected": [int(torch.argmin(krum_scores(d2, int(params["f"]))))]}


def multikrum_pass(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
                   device: torch.device, params: dict) -> dict:
    """Multi-Krum's global statistics (its declared pass): `krum_pass`'s ``sq_distances``
    and ``selected`` = its m clients of lowest Krum score (m None: K - f), ascending."""
    k, f = len(task_vectors), int(params["f"])
    m = k - f if params["m"] is None else int(params["m"])
    d2 = streaming.sq_distances(task_vectors, device, task_vectors_dtype(task_vectors))
    return {"sq_distances": d2, "selected": sorted(torch.argsort(krum_scores(d2, f), stable=True)[:m].tolist())}


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


@register(
    "krum", coordinatewise=False, check_params=_check_f, min_clients=_krum_min_clients,
    space=KRUM_SPACE,
    formula="the tau_i with the least sum of squared distances to its K-f-2 nearest others (K > 2f+2)",
    paper=Paper("Blanchard et al., NeurIPS 2017, \"Machine Learning with Adversaries: "
                "Byzantine Tolerant Gradient Descent\""),
    global_pass=krum_pass,  # the distances and the choice: a large-model round merges by groups
)
def krum(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    f: int = 1,
    stats: Mapping | None = None,
) -> StateDict:
    """Delta = tau_{i*},  i* = argmin_i score_i,  score_i = sum of squared distances from
    tau_i to its K-f-2 nearest other task vectors (Krum, Blanchard et al., NeurIPS 2017).

    Needs K > 2f+2. Weights are ignored (selection is by geometry); ties go to the lowest
    client index, so the result is order-dependent only on exact score ties.
    Distances are streamed block by block with float64 accumulation. stats (`krum_pass` on
    the whole task vectors): its choice is taken, these task vectors may be any subset of
    the whole one's tensors.
    """
    if stats is None:
        stats = krum_pass(task_vectors, weights, device, {"f": f})
    best = int(stats["selected"][0])
    return {k: v.detach().clone() for k, v in task_vectors[best].items()}


@register(
    "multikrum", coordinatewise=False, check_params=_check_f,
    min_clients=_multikrum_min_clients, space=KRUM_SPACE, global_pass=multikrum_pass,
    formula="the weighted mean of the m task vectors of lowest Krum score (m = K - f by default)",
    paper=Paper("Blanchard et al., NeurIPS 2017; El Mhamdi et al., ICML 2018"),
)
def multikrum(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    f: int = 1,
    m: int | None = None,
    stats: Mapping | None = None,
) -> StateDict:
    """Delta = sum_{i in S} p_i tau_i / sum_{i in S} p_i with S the m clients of lowest Krum
    score (Multi-Krum, Blanchard et al. 2017; El Mhamdi et al. 2018). m = None means K - f.

    Like Flower's `aggregate_krum(..., to_keep=m)` the selected updates are averaged with
    the client weights. Needs K > 2f+2 and m <= K - f. stats (`krum_pass` on the whole task
    vectors): its choice is taken, these task vectors may be any subset of its tensors.
    """
    if stats is None:
        stats = multikrum_pass(task_vectors, weights, device, {"f": f, "m": m})
    return _select_mean(task_vectors, weights, list(stats["selected"]), device)
