"""Per-client numbers a merge takes besides the task vectors: aggregation weights, local
step counts and FedNova normalisers, each validated into a float64 [K] tensor."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence

import torch

from fl_merge.core.task_vectors import MergeInputError

def _numbers(what: str, values, k: int) -> torch.Tensor:
    """float64 [k] from a sequence of k numbers (a list, tuple, tensor or array), or
    MergeInputError naming `what`."""
    if isinstance(values, (str, bytes, Mapping)):
        raise MergeInputError(f"{what} must be {k} numbers, got {values!r}")
    if isinstance(values, torch.Tensor):
        items = values.detach().cpu().reshape(-1).tolist()
    else:
        try:
            items = list(values)
        except TypeError:
            raise MergeInputError(f"{what} must be {k} numbers, got {values!r}") from None
    items = [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for v in items]
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, numbers.Real)]
    if bad:
        raise MergeInputError(f"{what} must be {k} numbers, got {bad[0]!r} among them")
    if len(items) != k:
        raise MergeInputError(f"{len(items)} {what} for {k} task vectors")
    try:
        return torch.tensor([float(v) for v in items], dtype=torch.float64)
    except OverflowError:
        raise MergeInputError(f"{what} must be finite numbers, got {items}") from None


def normalized_weights(weights: Sequence[float] | torch.Tensor | None, k: int) -> torch.Tensor:
    """p_i = w_i / sum_j w_j in float64 (uniform when weights is None)."""
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = _numbers("weights", weights, k)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise MergeInputError(f"weights must be finite, non-negative and not all zero: {w.tolist()}")
    w = w / w.max()  # the sum of huge finite weights must not overflow
    return w / w.sum()


def local_steps_tensor(local_steps: Sequence[float] | torch.Tensor | None, k: int) -> torch.Tensor | None:
    """The clients' local step counts as float64 [k] (None stays None); MergeInputError
    unless they are k finite positive numbers."""
    if local_steps is None:
        return None
    try:
        steps = _numbers("local_steps", local_steps, k)
    except MergeInputError as e:
        raise MergeInputError(f"local_steps must be {k} positive numbers ({e})") from None
    if not bool(torch.isfinite(steps).all()) or bool((steps <= 0).any()):
        raise MergeInputError(f"local_steps must be {k} positive numbers, got {steps.tolist()}")
    return steps


# Said once per calling line (Python's default warning filter).
STEPS_AS_NORMALISER_WARNING = (
    "FedNova normaliser missing for some clients: using their local_steps, the plain-SGD "
    "normaliser a_i = t_i, which is wrong for SGD with momentum (clients should report "
    "'fednova-a', see fednova_normaliser)"
)


def normaliser_values(normalisers: Sequence[float | None] | torch.Tensor | None, k: int) -> list:
    """The k given normalisers as floats, None for a client without one (all None when
    `normalisers` is None); MergeInputError unless each is a positive finite number or None."""
    if normalisers is None:
        return [None] * k
    if isinstance(normalisers, (str, bytes, Mapping)) or not isinstance(
            normalisers, (Sequence, torch.Tensor)):
        raise MergeInputError(f"normalisers must be {k} positive numbers (None for a client "
                              f"without one), got {normalisers!r}")
    given = normalisers.detach().cpu().reshape(-1).tolist() \
        if isinstance(normalisers, torch.Tensor) else list(normalisers)
    if len(given) != k:
        raise MergeInputError(f"{len(given)} normalisers for {k} task vectors")
    values: list = []
    for i, v in enumerate(given):
        v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        if v is not None:
            try:
                ok = not isinstance(v, bool) and isinstance(v, numbers.Real) \
                    and 0 < float(v) < float("inf")
            except OverflowError:
                ok = False
            if not ok:
                raise MergeInputError(f"normalisers must be {k} positive numbers (None for a "
                                      f"client without one), got {v!r} for client {i}")
            v = float(v)
        values.append(v)
    return values


def normalisers_tensor(
    normalisers: Sequence[float | None] | torch.Tensor | None,
    steps: torch.Tensor | None,
    k: int,
    names: Sequence[str] | None = None,
) -> torch.Tensor | None:
    """FedNova normalisers a_i = ||a_i||_1 as float64 [k]: the given ones, and for a client
    without one (None entry, or `normalisers` None) the plain-SGD normaliser a_i = t_i from
    `steps`, with a warning (once per calling line). None when no client has either;
    MergeInputError when some clients have one and others have neither, or on an invalid
    value."""
    values = normaliser_values(normalisers, k)
    missing = [i for i, v in enumerate(values) if v is None]
    if not missing:
        return torch.tensor(values, dtype=torch.float64)
    if steps is None:
        if len(missing) == k:
            return None
        who = str(names[missing[0]]) if names is not None else f"client {missing[0]}"
        raise MergeInputError(f"{who} has no normaliser and there are no local_steps to fall back "
                              "on: give every client's normaliser or local_steps")
    warnings.warn(STEPS_AS_NORMALISER_WARNING, UserWarning, stacklevel=3)
    return torch.tensor([steps[i].item() if v is None else v for i, v in enumerate(values)],
                        dtype=torch.float64)
