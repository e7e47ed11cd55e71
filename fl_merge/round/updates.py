"""Collect: client replies -> usable updates and task vectors; failures named, left out.

A client that fails, never replies, or sends a malformed or non-finite update is left out
and named; the round goes on while enough usable updates remain (`check_enough`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_merge.merging.registry import check_method_params
from fl_merge.io.client_checkpoints import CHECKPOINT_METRIC, CheckpointClientError, check_step_info
from fl_merge.round.protocol import FEDNOVA_A, LOCAL_STEPS, PARTITION_ID, TASK_NAME, speaks_grid
from fl_merge.core.task_vectors import MergeInputError, StateDict, one_line, task_vector


class MergeRoundError(RuntimeError):
    """The merge round cannot complete (failed clients, unusable replies)."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(one_line(message), *args)


@dataclass
class ClientUpdate:
    """One client's reply to the training message."""

    node_id: int
    metrics: dict[str, Any]
    state: StateDict  # full local weights as sent
    per_task: StateDict = field(default_factory=dict)  # its non-merged parameters (head)
    extras: dict[str, StateDict] = field(default_factory=dict)  # e.g. {"fisher": {...}}
    chunked: bool = False  # holds theta0 in node-local chunks: scored with chunked messages
    task: str | None = None  # the client's own name for its task (reply config `task-name`)

    @property
    def partition_id(self) -> int | None:
        pid = self.metrics.get(PARTITION_ID)
        return None if pid is None else int(pid)

    @property
    def label(self) -> str:
        pid = self.partition_id
        named = f"task {self.task}" if self.task is not None else None
        within = ", ".join(x for x in (f"partition {pid}" if pid is not None else None, named) if x)
        return f"node {self.node_id}" + (f" ({within})" if within else "")

    @property
    def identity(self) -> str:
        """A name that stays the same across runs of one config: the partition (its task),
        else the node id (a foreign client without partition-id). DARE keys its random masks
        by it, so merged results never depend on node ids or reply order."""
        pid = self.partition_id
        if pid is not None:
            return f"partition {pid}"
        return f"task {self.task}" if self.task is not None else f"node {self.node_id}"

    @property
    def grid_eval(self) -> bool:
        """The client announced the grid evaluation capability (fl_merge.round.protocol)."""
        return speaks_grid(self.metrics)


def reported_task_name(configs: Mapping[str, Mapping[str, Any]], node: int) -> str | None:
    """The `task-name` a train reply's ConfigRecords (name -> record) give, None when none
    does; MergeRoundError for one that is not a non-empty single-line string without spaces
    at either end, or two records naming different tasks."""
    names = {r[TASK_NAME] for r in configs.values() if TASK_NAME in r}
    if not names:
        return None
    if len(names) > 1:
        raise MergeRoundError(f"node {node} replied two task names, {', '.join(sorted(map(repr, names)))}; "
                              "reply one")
    (name,) = names
    if not isinstance(name, str) or not name.strip() or name != name.strip() or "\n" in name:
        raise MergeRoundError(f"node {node} replied {TASK_NAME}={name!r}; it must be a non-empty "
                              "string on one line, without spaces at either end")
    return name


def check_distinct_tasks(clients: Sequence[ClientUpdate]) -> None:
    """MergeRoundError when two usable clients replied the same `task-name` (the results are
    keyed by task, so one would hide the other)."""
    seen: dict[str, str] = {}
    for c in clients:
        if c.task is None:
            continue
        if c.task in seen:
            raise MergeRoundError(f"{seen[c.task]} and {c.label} both replied {TASK_NAME}={c.task!r}; "
                                  "each client's task needs its own name")
        seen[c.task] = c.label


def short_reason(reason: str) -> str:
    """The exception line of a client's error (Flower/Ray wrap it in a whole traceback)."""
    lines = [line.strip() for line in str(reason).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else "unknown error"
    return lines[-1].removesuffix("'>").strip()


def failure(node_id: int, stage: str, reason: str, client: ClientUpdate | None = None) -> dict[str, Any]:
    """A failure record naming the client (node id, and partition id when known)."""
    return {"client": client.label if client is not None else f"node {node_id}", "node_id": node_id,
            "partition_id": client.partition_id if client is not None else None,
            "stage": stage, "reason": short_reason(reason)}


def collect_updates(updates: Sequence[ClientUpdate], theta0: Mapping[str, torch.Tensor],
                    is_merged: Callable[[str], bool], spill: Any = None
                    ) -> tuple[list[ClientUpdate], list[StateDict], list[dict[str, Any]]]:
    """(usable clients, their task vectors, failures) in a deterministic order (partition
    id, else node id): merge results never depend on which reply arrived first. Each usable
    client's non-merged parameters go to `per_task` (own in-memory tensors).

    spill: a `fl_merge.io.spill.SpillDir`: task vectors are written there one tensor at a time
    and returned memory-mapped (same values), never K of them in memory."""
    merged_keys = [k for k in theta0 if is_merged(k)]
    if not merged_keys:
        raise MergeRoundError("the initial model has no merged parameters (check merge-keys)")
    clients, task_vectors, failures = [], [], []
    order = sorted(updates, key=lambda c: (math.inf if c.partition_id is None else c.partition_id,
                                           c.task or "", c.node_id))
    for c in order:
        try:
            tv = (task_vector(c.state, theta0, merged_keys) if spill is None
                  else spill.task_vector(f"tau-{c.identity}", c.state, theta0, merged_keys))
        except MergeInputError as e:
            failures.append(failure(c.node_id, "train", f"malformed update: {e}", c))
            continue
        bad = [k for k, v in tv.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            failures.append(failure(c.node_id, "train", f"non-finite update in {bad[0]}", c))
            continue
        c.per_task = {k: c.state[k] if spill is None else c.state[k].clone()
                      for k in c.state if not is_merged(k)}
        clients.append(c)
        task_vectors.append(tv)
    check_distinct_tasks(clients)
    return clients, task_vectors, failures


def check_enough(usable: int, min_clients: int, methods: Mapping[str, tuple[str, dict[str, Any]]],
                 failures: Sequence[Mapping[str, Any]]) -> None:
    """Merge with the usable clients if there are at least min_clients of them and every
    method's own minimum (e.g. krum: 2f+3); else one MergeRoundError naming every failure."""
    why = "; ".join(f"{f['client']}: {f['reason']}" for f in failures) or "none failed"
    if usable == 0 or usable < min_clients:
        raise MergeRoundError(f"only {usable} usable client update(s), need at least "
                              f"{max(min_clients, 1)} (min-clients); failures: {why}")
    for label, (name, params) in methods.items():
        try:
            check_method_params(name, params, usable)
        except MergeInputError as e:
            raise MergeRoundError(f"method '{label}' cannot merge the {usable} usable client "
                                  f"update(s): {e}; failures: {why}") from None


def check_checkpoint_steps(methods: Sequence[str], clients: Sequence[ClientUpdate]) -> None:
    """MergeRoundError when a method needs local steps (e.g. fednova) and a checkpoint client
    (train metric 'checkpoint' = 1) reported none, naming it and how to give them."""
    infos = [(c.label, LOCAL_STEPS in c.metrics or FEDNOVA_A in c.metrics)
             for c in clients if int(c.metrics.get(CHECKPOINT_METRIC, 0)) == 1]
    try:
        check_step_info(methods, infos)
    except CheckpointClientError as e:
        raise MergeRoundError(str(e)) from None
