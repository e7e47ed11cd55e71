"""Task registry: each task is a dataset with its own label space and train/val/test splits.

This module is the registry only. The built-in tasks register themselves in
clients/image_tasks.py (the MNIST family: suites mnist8, mnist-near/mid/far, vision8) and
clients/text_tasks.py (suite text); fl_merge.builtins imports both on the first lookup.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from torch.utils.data import TensorDataset

from fl_merge.registration import BuiltinRegistry


class UnknownTaskError(ValueError):
    pass


@dataclass(frozen=True)
class TaskData:
    name: str
    num_classes: int
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    # Data the task head is fitted on (default: train). Partitioned tasks share one head
    # fitted on public data, so every client of the task has the same head.
    probe: TensorDataset | None = None


@dataclass(frozen=True)
class SplitSizes:
    train: int = 2000
    val: int = 500
    test: int = 1000


TaskBuilder = Callable[[int, SplitSizes], TaskData]
# Each table loads fl_merge.builtins on first use (fl_merge/registration.py).
TASKS: MutableMapping[str, TaskBuilder] = BuiltinRegistry()
TASK_KINDS: MutableMapping[str, str] = BuiltinRegistry()  # task -> input kind (models.INPUT_KINDS)
SUITES: MutableMapping[str, list[str]] = BuiltinRegistry()  # suite -> its tasks


def register_task(name: str, kind: str = "image") -> Callable[[TaskBuilder], TaskBuilder]:
    def deco(fn: TaskBuilder) -> TaskBuilder:
        if name in TASKS:
            raise ValueError(f"task '{name}' registered twice")
        TASKS[name] = fn
        TASK_KINDS[name] = kind
        return fn

    return deco


def check_model_fits(model_kind: str, model: str, names: list[str]) -> None:
    """Raise UnknownTaskError when a task's inputs are not the kind the model reads."""
    wrong = [n for n in names if TASK_KINDS.get(n, model_kind) != model_kind]
    if wrong:
        raise UnknownTaskError(f"model '{model}' reads {model_kind} inputs but task(s) {wrong} are "
                               f"{TASK_KINDS[wrong[0]]} tasks")


def check_tasks(names: list[str]) -> None:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UnknownTaskError(f"unknown task(s) {unknown}; known: {', '.join(sorted(TASKS))}")


def suite_tasks(suite: str) -> list[str]:
    try:
        return list(SUITES[suite])
    except KeyError:
        raise UnknownTaskError(f"unknown task suite '{suite}'; known: {', '.join(sorted(SUITES))}") from None


@functools.lru_cache(maxsize=16)
def load_task(name: str, seed: int = 0, sizes: SplitSizes = SplitSizes()) -> TaskData:
    check_tasks([name])
    return TASKS[name](seed, sizes)


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")
