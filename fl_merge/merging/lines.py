"""LiNeS, layer-increasing network scaling (Wang et al., ICLR 2025, "LiNeS: Post-training
Layer Scaling Prevents Forgetting and Enhances Model Merging"): a modifier of any merge
method's update, scaling each tensor by its depth instead of one uniform lambda.

    scale(l) = alpha + beta * (l - 1) / (L - 1),   l = 1..L the tensor's layer

The authors' code (wang-kee/LiNeS, src/eval/eval.py, LiNeS_scaling; src/eval/aggregation.py
for alpha) scales the method's merged vector tau_MTL and applies it at coefficient 1:
theta = theta0 + scale(l) * tau_MTL, scale in the units of the method's own lambda. Here
tau_MTL is eta_for_lambda(method, 1, K) * Delta, so LiNeS REPLACES lambda: the scaled update
`lines_merge` returns, scale(l) * Delta, is applied at lambda = 1 (eta =
eta_for_lambda(method, 1, K)), and beta = 0 is the plain method at lambda = alpha.

Depth: read from each parameter's name by `pattern`, a regex whose first group is the
block index (default: HF `encoder.layer.3.` / `model.layers.3.` / T5 `block.3.`, timm
`blocks.3.`, GPT-2 `h.3.`, open_clip `resblocks.3.`). The distinct indices found, sorted,
are layers 1..L (a gap in the numbering, e.g. an nn.Sequential's 0, 3, 7, is not a layer).
A tensor whose name has no index (embeddings, the final norm, projections, heads) gets
alpha, the first layer's scale, as in the authors' code ("layers outside residual blocks").

alpha: a number, or "auto", the authors' multi-task rule alpha = ||sum_i tau_i||_1 /
(K ||tau_MTL||_1) (weighted here: ||sum_i p_i tau_i||_1 / ||tau_MTL||_1): the shallow
layers then carry the l1 mass of the plain average of the task vectors (1/K for Task
Arithmetic). beta: searched on validation; the authors' grid is 0.1, 0.2, .., 1.0
(np.linspace(0, 1, 11)[1:]; TIES 0.1..1.5). Their single-task editing (alpha = lambda,
beta = 1 - lambda) is the same function with those values.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fl_merge.core.task_vectors import MergeInputError, StateDict
from fl_merge.merging.method import is_number
from fl_merge.merging.registry import merge, normalized_weights
from fl_merge.merging.scales import eta_for_lambda
from fl_merge.merging.streaming import work_dtype

DEFAULT_PATTERN = r"(?:^|\.)(?:layers?|blocks?|resblocks|h)\.(\d+)\."
# The validation grid in the paper's units (wang-kee/LiNeS, src/eval/eval.py).
SPACE: dict[str, tuple] = {"alpha": ("auto",), "beta": tuple(round(0.1 * i, 1) for i in range(1, 11))}
DEFAULTS: dict[str, Any] = {"alpha": "auto", "beta": 0.5, "pattern": DEFAULT_PATTERN}


def check_lines(lines: Mapping[str, Any], allow_auto: bool = True) -> dict[str, Any]:
    """The full LiNeS setting (DEFAULTS updated by `lines`), or a one-line MergeInputError."""
    if not isinstance(lines, Mapping):
        raise MergeInputError(f"lines must be a mapping of alpha, beta, pattern, got {lines!r}")
    unknown = sorted(set(map(str, lines)) - set(DEFAULTS))
    if unknown:
        raise MergeInputError(f"lines: unknown key(s) {unknown}; known: {', '.join(DEFAULTS)}")
    full = {**DEFAULTS, **lines}
    alpha, beta, pattern = full["alpha"], full["beta"], full["pattern"]
    if alpha == "auto" and not allow_auto:
        raise MergeInputError("lines alpha=auto needs the whole merged vector's l1 norm, which a "
                              "tensor-by-tensor merge does not have: give alpha a number >= 0")
    if alpha != "auto" and not (is_number(alpha) and alpha >= 0):
        raise MergeInputError(f"lines alpha (the first layer's scale) must be a number >= 0 or "
                              f"auto, got {alpha!r}")
    if not is_number(beta) or beta < 0:
        raise MergeInputError(f"lines beta (the last layer's extra scale) must be a number >= 0, "
                              f"got {beta!r}")
    if not isinstance(pattern, str):
        raise MergeInputError(f"lines pattern must be a regex string, got {pattern!r}")
    try:
        groups = re.compile(pattern).groups
    except re.error as e:
        raise MergeInputError(f"lines pattern {pattern!r} is not a valid regex: {e}") from None
    if groups < 1:
        raise MergeInputError(f"lines pattern {pattern!r} needs a group capturing the layer "
                              r"index, e.g. r'blocks\.(\d+)\.'")
    return full


def depths(keys: Iterable[str], pattern: str = DEFAULT_PATTERN) -> dict[str, int | None]:
    """key -> its layer l in 1..L (the rank of its block index among those found), None for
    a key the pattern does not match. MergeInputError when no key matches or L = 1."""
    rx = re.compile(pattern)
    keys = list(keys)
    index: dict[str, int | None] = {}
    for key in keys:
        hit = rx.search(key)
        try:
            index[key] = int(hit.group(1)) if hit else None
        except (TypeError, ValueError):
            raise MergeInputError(f"lines pattern {pattern!r} captures {hit.group(1)!r} in "
                                  f"'{key}', not a layer index (digits)") from None
    found = sorted({i for i in index.values() if i is not None})
    if not found:
        raise MergeInputError(f"lines pattern {pattern!r} matches no parameter name (e.g. "
                              f"'{keys[0] if keys else ''}'): give pattern= a regex whose first "
                              r"group is the layer index, e.g. r'blocks\.(\d+)\.'")
    if len(found) < 2:
        raise MergeInputError(f"lines pattern {pattern!r} finds one layer only (index "
                              f"{found[0]}): LiNeS scales over at least 2 layers (L >= 2)")
    rank = {i: r + 1 for r, i in enumerate(found)}
    return {key: None if i is None else rank[i] for key, i in index.items()}


def layer_scales(keys: Iterable[str], alpha: float, beta: float,
                 pattern: str = DEFAULT_PATTERN) -> dict[str, float]:
    """key -> alpha + beta (l - 1) / (L - 1); alpha for a key without a layer index."""
    d = depths(keys, pattern)
    top = max(v for v in d.values() if v is not None)
    return {key: float(alpha) + (0.0 if l is None else float(beta) * (l - 1) / (top - 1))
            for key, l in d.items()}


def auto_alpha(task_vectors: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
               delta: Mapping[str, torch.Tensor], s: float = 1.0) -> float:
    """||sum_i p_i tau_i||_1 / ||tau_MTL||_1, tau_MTL = s * delta (in delta's dtype), the
    authors' K-task rule with weights p (0 when tau_MTL is 0). Streamed tensor by tensor in
    float64 (delta and the task vectors may be mapped files, read one tensor at a time):
    each tensor's two l1 norms, then their exactly rounded sums (math.fsum), so the value
    does not depend on the order of the tensors (a Delta merged group by group gives the
    whole merge's alpha bit for bit)."""
    num, den = [], []
    for key in delta:
        d = delta[key]
        den.append(float((d * s).to(torch.float64).abs().sum()))
        acc = torch.zeros(d.shape, dtype=torch.float64)
        del d
        for p, tv in zip(weights.tolist(), task_vectors):
            acc.add_(tv[key].to(torch.float64), alpha=p)
        num.append(float(acc.abs().sum()))
        del acc
    num_l1, den_l1 = math.fsum(num), math.fsum(den)
    return num_l1 / den_l1 if den_l1 > 0 else 0.0


def scale_update(delta: Mapping[str, torch.Tensor], scales: Mapping[str, float]) -> StateDict:
    """scales[key] * delta[key] per tensor (computed in float32 at least, in delta's dtype)."""
    return {key: (v.to(work_dtype(v.dtype)) * scales[key]).to(v.dtype) for key, v in delta.items()}


class ScaledState(Mapping):
    """scales[key] * delta[key] (`scale_update`), computed for one tensor when it is read:
    a Delta on disk is scaled one tensor at a time, never loaded whole."""

    def __init__(self, delta: Mapping[str, torch.Tensor], scales: Mapping[str, float]) -> None:
        self._delta, self._scales = delta, scales

    def __getitem__(self, key: str) -> torch.Tensor:
        return scale_update({key: self._delta[key]}, self._scales)[key]

    def __iter__(self):
        return iter(self._delta)

    def __len__(self) -> int:
        return len(self._delta)

    def __contains__(self, key: object) -> bool:
        return key in self._delta


def lines_scales(method: str, delta: Mapping[str, torch.Tensor], lines: Mapping[str, Any],
                 task_vectors: Sequence[Mapping[str, torch.Tensor]],
                 weights: Sequence[float] | torch.Tensor | None = None,
                 params: Mapping[str, Any] | None = None) -> dict[str, float]:
    """key -> scale(l) for `method`'s update `delta` (module docstring), the task vectors and
    weights it came from (read for alpha="auto" only, one tensor at a time, with tau_MTL =
    eta_for_lambda(method, 1, K) * delta), its params."""
    full = check_lines(lines)
    layer_of = depths(delta.keys(), full["pattern"])
    alpha = full["alpha"]
    if alpha == "auto":
        s = eta_for_lambda(method, 1.0, len(task_vectors), dict(params or {}))
        alpha = auto_alpha(task_vectors, normalized_weights(weights, len(task_vectors)), delta, s)
    return layer_scales(layer_of, alpha, full["beta"], full["pattern"])


def lines_update(method: str, delta: Mapping[str, torch.Tensor], lines: Mapping[str, Any],
                 task_vectors: Sequence[Mapping[str, torch.Tensor]],
                 weights: Sequence[float] | torch.Tensor | None = None,
                 params: Mapping[str, Any] | None = None) -> StateDict:
    """scale(l) * delta per tensor for `method`'s update `delta` (module docstring), the
    task vectors and weights it came from (read for alpha="auto" only), its params."""
    return scale_update(delta, lines_scales(method, delta, lines, task_vectors, weights, params))


def lines_merge(method: str, task_vectors: Sequence[Mapping[str, torch.Tensor]],
                weights: Sequence[float] | torch.Tensor | None = None,
                local_steps: Sequence[int] | None = None, *, lines: Mapping[str, Any] | None = None,
                **merge_kw) -> StateDict:
    """LiNeS on `method`: scale(l) * Delta per tensor (module docstring), where Delta =
    fl_merge.merge(method, task_vectors, weights, local_steps, **merge_kw). Apply it at
    lambda = 1: theta = theta0 + eta_for_lambda(method, 1, K, params) * result. `lines`:
    alpha (number or "auto"), beta, pattern (DEFAULTS for those not given). Every LiNeS
    input is checked before the merge runs."""
    full = check_lines(lines or {})
    if not task_vectors or not isinstance(task_vectors[0], Mapping):
        return merge(method, task_vectors, weights, local_steps, **merge_kw)  # merge says what is wrong
    depths(task_vectors[0].keys(), full["pattern"])  # refuses a pattern that finds < 2 layers
    delta = merge(method, task_vectors, weights, local_steps, **merge_kw)
    params = {k: v for k, v in merge_kw.items() if k not in ("normalisers", "names", "device", "extras")}
    return lines_update(method, delta, full, task_vectors, weights, params)


def lines_settings(given: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every LiNeS setting searched on validation: the paper's grids (SPACE), a key given one
    value pinned, a key given a list searched over it; pattern as given (else the default)."""
    given = dict(given or {})
    grids = {k: tuple(given[k]) if isinstance(given.get(k), (list, tuple)) else
             ((given[k],) if k in given else v) for k, v in SPACE.items()}
    base = {k: v for k, v in given.items() if k not in SPACE}
    empty = [k for k, v in grids.items() if not v]
    if empty:
        raise MergeInputError(f"lines: the grid of {empty[0]} is empty (give at least one value)")
    out = []
    for combo in itertools.product(*grids.values()):
        out.append(check_lines({**base, **dict(zip(grids, combo))}))
    return out
