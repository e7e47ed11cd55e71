"""Validation search: the candidates (knob setting, lambda) of each method, from the search
space every method declares in its own file (`register(..., space=...)`, read here from the
registry; there is no table of spaces).

A candidate is (knob setting, lambda): the method's hyper-parameters ("knobs") and its
paper's scale lambda, converted per method to our eta by `scales.eta_for_lambda` (Task
Arithmetic and the FL aggregators: eta = K * lambda; TIES: eta = lambda). Every candidate is
scored on validation; test only at the chosen one (fl_merge/round, docs/protocol.md "What
the server does with the scores").

The declared spaces follow the literature, learnt from the one-shot FL task-arithmetic code
(SilviaTao/one_shot_fl_task_arithmetic: FedGMA's rho over 0.1..0.9, CClip's radius over
evenly spaced values from the smallest to the largest task-vector norm, the end point left
out, lambda over 0.05..2.0) and the methods' papers (TIES: keep the top 10-30%; DARE: drop
50-90%; Breadcrumbs: drop the smallest 80-90%; trimmed mean: trim 10-40%; Krum: every f
that K allows). A knob is either a tuple of values or a function of the round's task
vectors (`Derived`), evaluated at merge time. A method that declares no space has only its
scale searched (Model Stock: its lambda = eta grid holds 1.0, the paper's model, so
search=paper can only do as well or better on validation than the paper's setting).
Overrides: a knob given one value in method-params is pinned (not searched), a list of
values replaces its grid; `lambdas` replaces the lambda grid.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fl_merge.merging.registry import Derived, check_method_params, get_method, replace_method
from fl_merge.core.task_vectors import MergeInputError

# lambda 0.05, 0.10, ..., 2.00 (40 values): the range the paper's code searches.
LAMBDAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 41))


def declare_space(method: str, **knobs: tuple | Derived) -> None:
    """Replace a registered method's declared search space (the same field its
    ``register(..., space=...)`` sets; a method file declares it there instead)."""
    m = get_method(method)
    unknown = sorted(set(knobs) - set(m.params))
    if unknown:
        raise MergeInputError(f"merge method '{method}' has no parameter(s) {unknown} to search")
    replace_method(m.name, space=dict(knobs))


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
    declared = get_method(method).space
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
