"""Who was lost, where and why: failure records as run.json and failure.json report them.

The server addresses clients by Flower node id; which partition (and so which task) a node
runs lives in that node's own config. A client that replies says its partition; a lost one
cannot. So a lost client's partition is worked out by elimination: the partitions with no
usable update are the missing tasks, and when exactly one train failure has no partition and
exactly one partition is missing, that failure is that partition. Otherwise the records keep
their node ids and `missing_tasks` lists the tasks (never a guess).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

FAILURE_FILE = "failure.json"
CACHE_NOTE = ("each finished client's update is in its client-update cache (~/.cache/fl-merge/updates "
              "on its machine, or the SuperNode's node-config cache-dir): a rerun of the same config "
              "with cache=true reuses them without retraining")


def stopped_reason(updates_received: int, parent_gone: bool) -> str:
    """Why a ServerApp stopped before its results: its parent process exited (so the
    SuperLink was stopped or died), or Flower told it to stop (SIGINT/SIGTERM: e.g. `flwr
    stop`); and at which point of the round, before any client update arrived or after."""
    stage = (f"after {updates_received} client update(s) had arrived" if updates_received
             else "while the clients were training (no update had arrived)")
    if parent_gone:
        return (f"the SuperLink went away {stage}: the ServerApp's parent process exited, so "
                f"the SuperLink was stopped or died; the run cannot finish")
    return f"the ServerApp was told to stop {stage} (by Flower: e.g. `flwr stop` or a lost SuperLink)"


def no_reply_reason(elapsed: float, timeout: float) -> str:
    """Why a message got no reply: the round timeout ran out, or Flower gave up on the node
    earlier (it ended the wait before the timeout: the node left, e.g. missed heartbeats)."""
    if elapsed >= 0.99 * timeout:
        return f"no reply within the round timeout ({timeout:g}s)"
    return (f"no reply: Flower stopped waiting for the node after {elapsed:.0f}s, before the "
            f"round timeout ({timeout:g}s); the node was lost")


def task_of(partition: int | None, task_names: Sequence[str] | None) -> str | None:
    if partition is None or task_names is None or not 0 <= partition < len(task_names):
        return None
    return task_names[partition]


def attribute(failures: Sequence[Mapping[str, Any]], usable: Iterable[int | None], num_clients: int,
              task_names: Sequence[str] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """(failures, missing tasks): one record per node in node-id order (its first failure: a
    node lost in training is not named again later), each with its partition and task where known (by
    elimination for one unnamed lost client, see the module docstring), and the tasks of the
    partitions 0..num_clients-1 that have no usable update (none listed when a usable client
    does not say its partition, e.g. a foreign ClientApp: then it cannot be known)."""
    seen: set[Any] = set()
    out: list[dict[str, Any]] = []
    for f in failures:
        key = f.get("node_id", f.get("client"))
        if key in seen:
            continue
        seen.add(key)
        out.append(dict(f))
    usable = list(usable)
    if any(p is None for p in usable):  # clients that do not say their partition: unknowable
        missing: list[int] = []
    else:
        missing = [p for p in range(num_clients) if p not in set(usable)]
    named = {f["partition_id"] for f in out if f.get("partition_id") is not None}
    unnamed = [f for f in out if f.get("partition_id") is None and f.get("stage") == "train"]
    open_partitions = [p for p in missing if p not in named]
    if len(unnamed) == 1 and len(open_partitions) == 1:
        f = unnamed[0]
        f["partition_id"] = open_partitions[0]
        f["client"] = f"{f['client']} (partition {open_partitions[0]})"
    for f in out:
        f["task"] = task_of(f.get("partition_id"), task_names)
    out.sort(key=lambda f: (f.get("node_id") is None, f.get("node_id") or 0))  # not sampling order
    return out, [task_of(p, task_names) or f"partition {p}" for p in missing]


def unscored_tasks(failures: Sequence[Mapping[str, Any]]) -> list[str]:
    """The tasks that were merged but have no test result: their client sent a usable
    update, then was lost at an evaluation stage (e.g. its link went down after training), so
    nobody scored the merged model on its data. Its update stays in the merge; the task is in
    neither results.csv's test rows nor `missing_tasks` (which holds the tasks never merged).
    In failure order (node-id order after `attribute`), each task once; a client with no task
    name is listed by its label."""
    out: list[str] = []
    for f in failures:
        if f.get("stage") == "train":
            continue
        name = f.get("task") or f["client"]
        if name not in out:
            out.append(name)
    return out


def failure_record(reason: str, stage: str, finished: Sequence[Mapping[str, Any]],
                   failures: Sequence[Mapping[str, Any]], missing_tasks: Sequence[str],
                   replies_lost: bool = False) -> dict[str, Any]:
    """failure.json of a run that did not finish: why, at which stage, which clients had
    finished (partition, task, node) and where their updates are, who was lost.
    replies_lost: the server lost contact (its SuperLink died), so clients may have
    finished and cached their update without the server knowing."""
    if replies_lost:
        cached = "clients may have finished without the server knowing: " + CACHE_NOTE
    else:
        cached = CACHE_NOTE if finished else "no client finished"
    return {"status": "failed", "reason": reason, "stage": stage, "finished_clients": list(finished),
            "lost_clients": list(failures), "missing_tasks": list(missing_tasks),
            "cached_updates": cached}


# Exit status of a run that finished but lost clients the user did not allow to lose
# (`fl-merge-run`, `fl-merge`; README "Exit status"): distinct from 1 (failed) and 2 (bad input).
LOST_CLIENTS_EXIT = 3
EXIT_STATUS_HELP = (
    "exit status: 0 the run finished with every client (or lost only what min-clients allows); "
    "1 the run failed (failure.json says why); 2 bad input, found before anything started; "
    f"{LOST_CLIENTS_EXIT} the run finished but lost clients: the last lines name each lost task "
    "and why (run.json failures); set min-clients=N to accept a run that keeps N")


def lost_clients(meta: Mapping[str, Any]) -> list[str]:
    """One line per client a finished run lost, from its run.json: which task (else which
    client), at which stage and why, and what that did to the results (not merged, or merged
    but not scored on test). [] when none was lost."""
    lines = []
    for f in meta.get("failures") or []:
        who = f"task {f['task']}, {f['client']}," if f.get("task") else str(f["client"])
        effect = ("not merged, no results" if f.get("stage") == "train"
                  else "merged, but not scored on test")
        lines.append(f"{who} lost at {f.get('stage', '?')}: {f.get('reason', '?')}; {effect}")
    named = {f.get("task") for f in meta.get("failures") or []}
    lines += [f"task {t}: no usable update; not merged, no results"
              for t in meta.get("missing_tasks") or [] if t not in named]
    return lines


def lost_clients_exit(meta: Mapping[str, Any], min_clients: int) -> int:
    """0, or LOST_CLIENTS_EXIT when the run lost a client and the user did not allow losses:
    min-clients 0 (the default) asks for every client; min-clients N > 0 allows the round to
    go on with N of them, so a finished run with losses is then what was asked for."""
    return LOST_CLIENTS_EXIT if lost_clients(meta) and min_clients <= 0 else 0


def lost_clients_report(meta: Mapping[str, Any], min_clients: int, num_clients: int) -> list[str]:
    """What a CLI prints at the end of a finished run that lost clients: a head line (how
    many, and the exit status or that min-clients allowed it), then `lost_clients`' lines.
    [] when none was lost."""
    lost = lost_clients(meta)
    if not lost:
        return []
    head = f"the results lost {len(lost)} of {num_clients} clients"
    if lost_clients_exit(meta, min_clients):
        kept = max(num_clients - len(lost), 1)
        head += (f"; exit status {LOST_CLIENTS_EXIT} (to accept a run that keeps at least {kept}, "
                 f"set min-clients={kept})")
    else:
        head += f" (allowed: min-clients={min_clients})"
    return [head, *lost]
