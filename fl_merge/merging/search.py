"""Each merge method's validation search space, in its own units (the one place it is declared).

A candidate is (knob setting, lambda): the method's hyper-parameters ("knobs") and its
paper's scale lambda, converted per method to our eta by `scales.eta_for_lambda` (Task
Arithmetic and the FL aggregators: eta = K * lambda; TIES: eta = lambda). Every candidate is
scored on validation; test only at the chosen one (fl_merge/round, docs/protocol.md "What
the server does with the scores").

Defaults follow the literature, learnt from the one-shot FL task-arithmetic code
(SilviaTao/one_shot_fl_task_arithmetic: FedGMA's rho over 0.1..0.9, CClip's radius over
evenly spaced values from the smallest to the largest task-vector norm, the end point left
out, lambda over 0.05..2.0) and the methods' papers (TIES: keep the top 10-30%; DARE: drop
50-90%; Breadcrumbs: drop the smallest 80-90%; trimmed mean: trim 10-40%; Krum: every f
that K allows). A knob is either a tuple of values or a function of the round's task
vectors (`Derived`), evaluated at merge time. Methods not listed have only their scale
(Model Stock: its lambda = eta grid holds 1.0, the paper's model, so search=paper can only
do as well or better on validation than the paper's setting).
Overrides: a knob given one value in method-params is pinned (not searched), a list of
values replaces its grid; `lambdas` replaces the lambda grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fl_merge.merging.registry import check_method_params, get_method
from fl_merge.core.task_vectors import MergeInputError

# lambda 0.05, 0.10, ..., 2.00 (40 values): the range the paper's code searches.
LAMBDAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 41))
CCLIP_POINTS = 8  # radii per round for cclip


@dataclass(frozen=True)
class Derived:
    """A knob grid computed from the round's task vectors at merge time: fn(task_vectors)."""

    fn: Callable[[Sequence[Mapping[str, torch.Tensor]]], list[float]]
    doc: str

    def __repr__(self) -> str:
        return self.doc


def task_vector_norms(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """||tau_i||_2 over every merged tensor together (float64)."""
    return [math.sqrt(sum(float(v.double().pow(2).sum()) for v in tv.values())) for tv in task_vectors]


def cclip_radii(task_vectors: Sequence[Mapping[str, torch.Tensor]], points: int = CCLIP_POINTS
                ) -> list[float]:
    """CClip's radius grid: `points` evenly spaced values from min ||tau_i|| towards
    max ||tau_i||, the maximum left out (there nobody is clipped: plain averaging); one value
    when every norm is equal. Radii <= 0 are dropped (a zero update)."""
    norms = task_vector_norms(task_vectors)
    lo, hi = min(norms), max(norms)
    values = [lo] if hi <= lo else [float(v) for v in np.linspace(lo, hi, points, endpoint=False)]
    return [v for v in values if v > 0]


def krum_fs(task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[int]:
    """Every Byzantine count f that Krum can run with on K clients (K > 2f + 2)."""
    return list(range(0, (len(task_vectors) - 3) // 2 + 1))


def _tenths(lo: int, hi: int) -> tuple[float, ...]:
    return tuple(round(0.1 * i, 1) for i in range(lo, hi + 1))


# method -> knob -> values or Derived (the literature defaults; see the module docstring).
SPACES: dict[str, dict[str, tuple | Derived]] = {
    "fedgma": {"rho": _tenths(1, 9)},
    "cclip": {"tau": Derived(cclip_radii, "linspace(min ||tau_i||, max ||tau_i||), end point excluded")},
    "ties": {"density": _tenths(1, 3)},
    "dare": {"drop_rate": (0.5, 0.7, 0.9)},
    "breadcrumbs": {"gamma": (0.8, 0.85, 0.9)},
    "trimmed_mean": {"beta": _tenths(1, 4)},
    "krum": {"f": Derived(krum_fs, "0..(K-3)//2")},
    "multikrum": {"f": Derived(krum_fs, "0..(K-3)//2")},
    "hetero": {"gamma": (0.5, 1.0, 2.0)},
}


def declare_space(method: str, **knobs: tuple | Derived) -> None:
    """Declare (or replace) a registered method's knob grids, e.g. for a plugin method."""
    m = get_method(method)
    unknown = sorted(set(knobs) - set(m.params))
    if unknown:
        raise MergeInputError(f"merge method '{method}' has no parameter(s) {unknown} to search")
    SPACES[m.name] = dict(knobs)


def is_grid(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def check_space_params(method: str, params: Mapping[str, Any], num_clients: int | None = None,
                       searched: bool = False) -> dict[str, Any]:
    """The method's full fixed parameters; a list value (a grid) is checked value by value
    (each with the fixed ones and, given num_clients, against K). MergeInputError otherwise.
    searched: the method's knobs will be searched, so a default value K cannot run with
    (Krum's f=1 on 3 clients) is no error: the round keeps the settings K allows."""
    fixed = {k: v for k, v in params.items() if not is_grid(v)}
    if searched and knob_grids(method, params):
        num_clients = None
    full = check_method_params(method, fixed, num_clients)
    for k, values in params.items():
        if is_grid(values):
            if not values:
                raise MergeInputError(f"merge method '{method}': the grid of {k} is empty")
            for v in values:
                check_method_params(method, {**fixed, k: v}, num_clients)
    return full


def knob_grids(method: str, given: Mapping[str, Any]) -> dict[str, tuple | Derived]:
    """The knobs searched for `method`: its declared grids, less the knobs given one value
    (pinned), with the knobs given a list of values searched over that list."""
    declared = SPACES.get(get_method(method).name, {})
    out = {k: v for k, v in declared.items() if k not in given}
    out.update({k: tuple(v) for k, v in given.items() if is_grid(v)})
    return out


def expand(method: str, params: Mapping[str, Any], grids: Mapping[str, tuple | Derived],
           task_vectors: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Every knob setting (full parameters) of `method`: the product of its grids (derived
    ones computed from `task_vectors`), in grid order, keeping only settings the method
    accepts with K = len(task_vectors) clients (duplicates dropped). No knob, or none valid:
    the fixed parameters alone (then merge() names what is wrong)."""
    k = len(task_vectors)
    names = list(grids)
    values = [list(g.fn(task_vectors)) if isinstance(g, Derived) else list(g) for g in grids.values()]
    out: list[dict[str, Any]] = []
    for combo in itertools.product(*values):
        setting = {**params, **dict(zip(names, combo))}
        try:
            full = check_method_params(method, setting, k)
        except MergeInputError:
            continue
        if full not in out:
            out.append(full)
    return out or [dict(params)]


def describe(grids: Mapping[str, tuple | Derived]) -> dict[str, Any]:
    """JSON-friendly form of knob grids (run.json)."""
    return {k: (repr(g) if isinstance(g, Derived) else list(g)) for k, g in grids.items()}
