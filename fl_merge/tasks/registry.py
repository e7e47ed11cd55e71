"""Task registry: each task is a dataset with its own label space and train/val/test splits.

This module is the registry only. The built-in tasks register themselves in
fl_merge/tasks/image.py (the MNIST family: suites mnist8, mnist-near/mid/far, vision8) and
fl_merge/tasks/text.py (suite text); fl_merge.core.registration imports both on the first lookup.
A task may also be named by a spec ``<format>:<location>?<options>`` (a task declared from
data: fl_merge/tasks/from_data.py registers the formats as task families, docs/data.md); the
functions below take either kind of name.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from torch.utils.data import TensorDataset

from fl_merge.core.registration import TASK_MODULES, BuiltinRegistry


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
# Each table loads fl_merge.core.registration on first use (fl_merge/core/registration.py).
TASKS: MutableMapping[str, TaskBuilder] = BuiltinRegistry(TASK_MODULES)
TASK_KINDS: MutableMapping[str, str] = BuiltinRegistry(TASK_MODULES)  # task -> input kind (models.INPUT_KINDS)
SUITES: MutableMapping[str, list[str]] = BuiltinRegistry(TASK_MODULES)  # suite -> its tasks


@dataclass(frozen=True)
class TaskFamily:
    """Tasks named ``<prefix>:<rest>``, built from the name itself (e.g. a data file).

    check(name) validates the name and its data before any training (raises ValueError
    with a one-line message) and returns the input kind; load(name, seed, sizes) builds
    the task; fingerprint(name) is a string that changes when the task's data changes (it
    keys the client-update cache beside the name)."""

    usage: str
    check: Callable[[str], str]
    load: Callable[[str, int, SplitSizes], TaskData]
    fingerprint: Callable[[str], str]


TASK_FAMILIES: MutableMapping[str, TaskFamily] = BuiltinRegistry(TASK_MODULES)  # prefix (no ':') -> family


def register_task_family(prefix: str, family: TaskFamily) -> None:
    if prefix in TASK_FAMILIES:
        raise ValueError(f"task family '{prefix}:' registered twice")
    TASK_FAMILIES[prefix] = family


def task_family(name: str) -> TaskFamily | None:
    """The family of a spec name ('csv:/a.csv?...'), None for a registered task name (those
    have no ':'). Raises UnknownTaskError for a prefix no family has."""
    prefix, sep, _ = name.partition(":")
    if not sep:
        return None
    if prefix not in TASK_FAMILIES:
        forms = ", ".join(f.usage for f in TASK_FAMILIES.values())
        raise UnknownTaskError(f"task '{name}': unknown data format '{prefix}'; a task is a "
                               f"registered name or one of: {forms}")
    return TASK_FAMILIES[prefix]


def task_kind(name: str) -> str | None:
    """The input kind of a task (models.INPUT_KINDS); None when unknown. Checks a spec's data."""
    family = task_family(name)
    if family is None:
        return TASK_KINDS.get(name)
    try:
        return family.check(name)
    except ValueError as e:
        raise UnknownTaskError(str(e)) from None


def task_fingerprint(name: str) -> str:
    """'' for a registered task; for a spec, a string that changes with its data."""
    family = task_family(name)
    return family.fingerprint(name) if family is not None else ""


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
    kinds = {n: task_kind(n) for n in names}
    wrong = [n for n in names if kinds[n] not in (None, model_kind)]
    if wrong:
        raise UnknownTaskError(f"model '{model}' reads {model_kind} inputs but task(s) {wrong} are "
                               f"{kinds[wrong[0]]} tasks")


def check_tasks(names: list[str]) -> None:
    """Raise UnknownTaskError (one line) for an unknown name or a spec whose data is unusable
    (missing file or column, one class, too few examples): before any training."""
    if "???" in names:  # Hydra's mandatory marker (configs/data/files.yaml) left unset
        raise UnknownTaskError("data.tasks is not set: give data.tasks=[...], task names or "
                               "tasks from data (docs/data.md)")
    for name in names:
        if task_family(name) is not None:
            task_kind(name)
    unknown = [n for n in names if task_family(n) is None and n not in TASKS]
    if unknown:
        forms = ", ".join(f.usage for f in TASK_FAMILIES.values())
        raise UnknownTaskError(f"unknown task(s) {unknown}; known: {', '.join(sorted(TASKS))}"
                               + (f"; or a task from data: {forms} (docs/data.md)" if forms else ""))


def suite_tasks(suite: str) -> list[str]:
    try:
        return list(SUITES[suite])
    except KeyError:
        raise UnknownTaskError(f"unknown task suite '{suite}'; known: {', '.join(sorted(SUITES))}") from None


@functools.lru_cache(maxsize=16)
def load_task(name: str, seed: int = 0, sizes: SplitSizes = SplitSizes()) -> TaskData:
    family = task_family(name)
    if family is not None:
        return family.load(name, seed, sizes)
    check_tasks([name])
    return TASKS[name](seed, sizes)


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")
