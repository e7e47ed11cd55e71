"""DARE, Drop And REscale (Yu et al., ICML 2024), then Task Arithmetic or TIES (DARE-TIES,
with the block machinery of fl_merge/methods/ties.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging import conventions, streaming
from fl_merge.merging.blocks import task_vectors_dtype
from fl_merge.merging.registry import Paper, is_integer, number_param, register
from fl_merge.methods.ties import check_density, ties_merge, ties_mergekit, ties_transform_pass


def dare_seed(seed: int, client: str, key: str) -> int:
    """The seed of one DARE mask, from the run's seed, the client's name and the tensor's
    name: a stable hash (BLAKE2b, the same in every process, unlike Python's hash), so a
    client's mask does not depend on where it sits in the list."""
    msg = "\x1f".join((str(int(seed)), client, key)).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") % (2**63)


def keep_mask(seed: int, client: str, key: str, numel: int, keep_p: float) -> torch.Tensor:
    """DARE's keep mask of one client's tensor (bool [numel], on the CPU): u < keep_p for
    u uniform from a CPU generator seeded by `dare_seed(seed, client, key)`."""
    g = torch.Generator().manual_seed(dare_seed(seed, client, key))
    return torch.rand(numel, generator=g) < keep_p


def _check_dare(params: dict) -> None:
    r = number_param(params, "drop_rate")
    if not 0.0 <= r < 1.0:
        raise MergeInputError(f"drop_rate must lie in [0, 1), got {params['drop_rate']}")
    if not isinstance(params["base"], str) or params["base"] not in ("fedavg", "ties"):
        raise MergeInputError(f"base must be 'fedavg' or 'ties', got {params['base']!r}")
    check_density(params)
    conventions.check_convention(params)
    if not is_integer(params["seed"]):
        raise MergeInputError(f"seed must be an integer, got {params['seed']!r}")


def _is_per_tensor(params: Mapping) -> bool:
    """Masks are per tensor by definition; the TIES top-k threshold and tie sign are not,
    unless nothing is trimmed or mergekit's TIES (per tensor) runs."""
    return (params["base"] != "ties" or float(params["density"]) >= 1.0
            or params["convention"] == "mergekit")


def _names(names: Sequence[str] | None, k: int) -> list[str]:
    names = [f"client {i}" for i in range(k)] if names is None else list(names)
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise MergeInputError(f"dare keys its random masks by client name: names must be unique, "
                              f"got {dup!r} twice")
    return names


def _transform(names: list[str], seed: int, drop_rate: float, convention: str):
    """DARE's drop and rescale of client i's flat tensor `key`, `x` (a function of the whole
    tensor: its mask is drawn for the whole tensor, keyed by (seed, name, key))."""
    keep_p = 1.0 - float(drop_rate)

    def transform(i: int, key: str, x: torch.Tensor) -> torch.Tensor:
        if drop_rate == 0:
            return x
        keep = keep_mask(seed, names[i], key, x.numel(), keep_p).to(x.device).reshape(x.shape)
        if convention == "mergekit":
            return conventions.l1_rescale(x, x * keep)
        return x * keep / keep_p

    return transform


def dare_pass(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
              device: torch.device, params: dict, names: Sequence[str] | None = None) -> dict | None:
    """DARE-TIES's global statistics (its declared pass, fl_merge/merging/passes.py): TIES's
    thresholds and tie sign over the whole dropped and rescaled vectors
    (`ties.ties_transform_pass`; the masks are the merge's own, keyed by client name). None
    where dare is per tensor already (base fedavg, density 1, convention=mergekit)."""
    if _is_per_tensor(params):
        return None
    transform = _transform(_names(names, len(task_vectors)), params["seed"], params["drop_rate"],
                           params["convention"])
    return ties_transform_pass(task_vectors, weights, device, float(params["density"]), transform)


@register(
    "dare", coordinatewise=False, check_params=_check_dare,
    lambda_scale=lambda params: "delta" if params.get("base") == "ties" else "sum",
    per_tensor_exact=_is_per_tensor,
    global_pass=dare_pass,  # DARE-TIES: TIES's numbers on the dropped vectors, by groups
    space={"drop_rate": (0.5, 0.7, 0.9)},
    formula="Bernoulli(1 - drop_rate) masks seeded by (seed, client name, tensor name), rescaled "
            "by 1/(1 - drop_rate) (convention=mergekit: to the tensor's l1 norm), then the fedavg "
            "mean or TIES (base)",
    paper=Paper("Yu et al., ICML 2024, \"Language Models are Super Mario: Absorbing Abilities "
                "from Homologous Models as a Free Lunch\""),
)
def dare(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    names: Sequence[str] | None = None,
    device: torch.device = torch.device("cpu"),
    drop_rate: float = 0.9,
    seed: int = 0,
    base: str = "fedavg",
    density: float = 1.0,
    convention: str = "fl-merge",
    stats: Mapping | None = None,
) -> StateDict:
    """DARE, Drop And REscale (Yu et al., ICML 2024, "Language Models are Super Mario"):
    hat tau_i = m_i * tau_i / (1 - drop_rate), m_i ~ Bernoulli(1 - drop_rate) per entry,
    then base="fedavg": Delta = sum_i p_i hat tau_i (unbiased: E[Delta] = fedavg), or
    base="ties": TIES(hat tau, density) (DARE-TIES; density 1 = sign election and
    disjoint mean without further trimming).

    Masks come from a CPU generator seeded by (seed, client name, tensor name)
    (`dare_seed`): a client keeps its mask wherever it sits in the list, so the result does
    not depend on client order, and a given seed gives the same masks on every device and
    in every call. Names must be unique and stable across runs (a task or partition, not a
    node id that changes every run). Without `names` (merge(..., names=None)) a client is
    named by its position, "client <i>", so reordering clients then changes the masks.

    convention="mergekit" (mergekit 0.1.5's dare_linear / dare_ties: sparsify.bernoulli
    with rescale, merge_methods/generalized_task_arithmetic.py): the kept entries are
    rescaled so that the tensor keeps its l1 norm, masked * ||tau||_1 / ||masked||_1
    (`conventions.l1_rescale`), instead of the paper's 1/(1 - drop_rate), and base="ties"
    follows mergekit's TIES rules (`ties.ties_mergekit`: per tensor, exact top-k, an exact-0
    vote elects +). mergekit's density is our 1 - drop_rate; its dare_ties trims nothing
    further (our density=1) and, with its default normalize: false, sums the agreeing
    clients where we average them (so only its normalize: true is this method). Its masks
    come from torch's global generator (torch.bernoulli), ours from `keep_mask`: the same
    distribution, not the same draws (the parity test feeds ours to mergekit's bernoulli).

    stats (`dare_pass` on the whole task vectors, the same names and parameters): DARE-TIES
    merges these task vectors (any subset of the whole one's tensors) with the whole
    vectors' thresholds and tie sign: exactly those tensors of the whole merge.
    """
    ref = task_vectors[0]
    keys = list(ref)
    dtype = task_vectors_dtype(task_vectors)
    transform = _transform(_names(names, len(task_vectors)), seed, drop_rate, convention)
    if base == "ties":
        if convention == "mergekit":
            return ties_mergekit(task_vectors, weights, device, density, transform)
        return ties_merge(task_vectors, weights, device, density, transform, stats=stats)
    p = weights.tolist()
    out = {}
    for key in keys:
        acc = torch.zeros(ref[key].numel(), dtype=dtype, device=device)
        for i, tv in enumerate(task_vectors):
            acc.add_(transform(i, key, tv[key].reshape(-1).to(device=device, dtype=dtype)), alpha=p[i])
        out[key] = acc
    return streaming.to_output(out, ref)

