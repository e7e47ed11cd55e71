"""The run's task names (one per client, index = partition id) and the check of its model,
for fl-merge's own clients and for an app's own ClientApp (docs/own_app.md).

fl-merge's own client builds each task and the model from its registries, so their names
must be registered (or tasks from data, docs/data.md). An app's own ClientApp brings its own
data and model: its task names are the user's labels, checked only for being one per client
and distinct, and `model` is a label too when the base comes from `base-checkpoint`.
"""

from __future__ import annotations

from typing import Protocol

from fl_merge.config.parsing import ConfigError
from fl_merge.core.values import split_list


class TaskSettings(Protocol):
    """The fields of a RunConfig read here."""

    num_clients: int
    data: str
    tasks: str
    suite: str
    partition_task: str
    model: str
    base_checkpoint: str


def own_task_names(tasks: str, k: int) -> list[str]:
    """An app's own clients: the user's names (`tasks`), else client-0 .. client-<k-1>."""
    return split_list(tasks) if tasks.strip() else [f"client-{i}" for i in range(k)]


def resolve_task_names(run: TaskSettings, own_clients: bool) -> list[str]:
    """The first num-clients task names; ConfigError (one line) for unknown fl-merge tasks,
    too few names or a repeated one."""
    from fl_merge.tasks.registry import UnknownTaskError, check_tasks, suite_tasks

    k = run.num_clients
    if own_clients and run.data != "tasks":
        raise ConfigError(f"data={run.data} splits fl-merge's own tasks, but the app's own ClientApp "
                          f"brings its data: leave data=tasks and name its clients' tasks in tasks=")
    try:
        if own_clients:
            tasks = own_task_names(run.tasks, k)
        elif run.data != "tasks":
            check_tasks([run.partition_task])
            tasks = [f"{run.partition_task}/{i}" for i in range(k)]
        elif run.tasks.strip():
            tasks = split_list(run.tasks)
            check_tasks(tasks)
        else:
            tasks = suite_tasks(run.suite)
    except UnknownTaskError as e:
        raise ConfigError(str(e)) from None
    if k > len(tasks):
        raise ConfigError(f"num-clients={k} but only {len(tasks)} tasks are available ({', '.join(tasks)})")
    tasks = tasks[:k]
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks repeat: {tasks}")
    return tasks


def uses_registry_model(run: TaskSettings, own_clients: bool) -> bool:
    """Whether `model` names a model of fl-merge's registry that the run builds (theta0 comes
    from it): always for fl-merge's own clients; for an app's own clients only without a
    base-checkpoint (with one, `model` is just a label)."""
    return not (own_clients and run.base_checkpoint)


def check_model(run: TaskSettings, tasks: list[str], own_clients: bool) -> None:
    """`model` is one fl-merge builds for these tasks; for an app's own clients with a
    base-checkpoint it is only a name (no check), without one it is where theta0 comes from."""
    from fl_merge.models.registry import get_model_spec
    from fl_merge.tasks.registry import check_model_fits

    if not uses_registry_model(run, own_clients):
        return
    try:
        spec = get_model_spec(run.model)
        spec.check_installed()
        if not own_clients:
            check_model_fits(spec.input_kind, run.model,
                             [run.partition_task] if run.data != "tasks" else tasks)
    except (ValueError, OSError, ImportError) as e:  # unknown, missing path or extra, wrong kind
        raise ConfigError(str(e)) from None
