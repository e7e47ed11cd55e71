"""fl-merge's own client's side of chunked messages (run-config `chunk-mib`, docs/protocol.md
"Chunked messages").

Every group of tensors the server sends (`chunk_put`: theta0, each Delta, the client's own
per-task parameters) is written to a node-local safetensors file; the train and score
messages that follow carry config only and say how many groups of each the client holds.
The client reads them back memory-mapped (fl_merge.io.spill.MappedState), trains or scores
as with whole-model messages, and keeps its update in node-local files too, one per group,
which the server fetches one at a time (`chunk_get`): groups of at most the train config's
reply limit (`chunk-reply-bytes`, about half a chunk; `update_limit`). Files, not Flower's
node state: in a deployment each message may run in a new ClientApp process, and Flower's context state
travels with every message. The folder is keyed by run and node, under node-config
`cache-dir` (default the system's temp folder), and removed when the server says the run is
done with it (`chunk_drop`). A node killed mid-round never gets that message: each folder
names its owner (the process above the ClientApp that outlives one message: the SuperNode,
or the simulation's Ray worker parent) and host, and the first group a node receives in a
run removes the sibling folders of this host whose owner is gone (`sweep_orphans`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from safetensors.torch import load_file, save_file

from fl_merge.io.spill import JoinedState, MappedState
from fl_merge.round.chunks import (DELTA_GROUPS, DROP, GET, INDEX_KEY, LIMIT_KEY, OWN_GROUPS, PUT,
                                   REPLY_GROUPS, REPLY_LIMIT_KEY, SLOT_KEY, THETA0_GROUPS, chunk_groups,
                                   largest_tensor, reply_limit)

__all__ = ["PUT", "GET", "DROP", "put", "get", "drop", "holds_chunks", "theta0", "keep_update",
           "scoring_inputs", "chunk_folder", "sweep_orphans"]

FOLDER = "fl-merge-chunks"
UPDATE = "update"  # the slot of the client's own update (full weights and extras)
OWNER = "owner.json"  # {"host", "pid", "started"} of the process that owns a run's folder


def chunk_folder(context: Context) -> Path:
    """This run's node-local folder on this node."""
    base = context.node_config.get("cache-dir") or tempfile.gettempdir()
    return Path(str(base)).expanduser() / FOLDER / f"run-{context.run_id}-node-{context.node_id}"


def _path(folder: Path, slot: str, index: int) -> Path:
    if not slot.replace("-", "").isalnum() or index < 0:
        raise ValueError(f"bad chunk slot '{slot}' or index {index}")
    return folder / f"{slot}-{index:05d}.safetensors"


def _write(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """One group to `path`, whole or not at all (written beside it, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(part))
    os.replace(part, path)


def _read(folder: Path, slot: str, count: int) -> JoinedState:
    """The `count` groups of `slot` as one memory-mapped state; an error naming a missing file."""
    paths = [_path(folder, slot, i) for i in range(count)]
    for p in paths:
        if not p.exists():
            raise ValueError(f"chunk file {p} is missing: this node did not receive {slot} group "
                             f"{paths.index(p)} of {count} (was the node restarted mid-run?)")
    return JoinedState([MappedState(p) for p in paths])


def holds_chunks(config: Mapping[str, Any]) -> bool:
    """Whether a train or score message refers to chunks this node holds (else whole-model)."""
    return THETA0_GROUPS in config


def owner(pid: int | None = None) -> dict[str, Any]:
    """This host and the process `pid` (default the parent of this ClientApp process) with its
    start time, which tells it from a later process given the same pid."""
    proc = psutil.Process(os.getppid() if pid is None else pid)
    return {"host": socket.gethostname(), "pid": proc.pid, "started": proc.create_time()}


def _alive(record: Mapping[str, Any]) -> bool:
    try:
        return psutil.Process(int(record["pid"])).create_time() == float(record["started"])
    except psutil.NoSuchProcess:
        return False


def sweep_orphans(folder: Path) -> list[Path]:
    """Remove the run folders beside `folder` whose owner ran on this host and is gone (a node
    killed before its chunk_drop); a folder without an owner record, another host's, or one
    whose owner lives is kept. Returns the folders removed."""
    removed = []
    for other in folder.parent.glob("run-*"):
        try:
            record = json.loads((other / OWNER).read_text())
            orphan = other != folder and record["host"] == socket.gethostname() and not _alive(record)
        except (OSError, ValueError, KeyError, TypeError):  # no record, or one being written
            continue
        if orphan:
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other)
    return removed


def put(msg: Message, context: Context) -> Message:
    """Store one group of tensors (config: slot and index) in this run's node-local folder;
    the run's first group there records the folder's owner and sweeps orphans beside it."""
    config = msg.content["config"]
    folder = chunk_folder(context)
    if not (folder / OWNER).exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / OWNER).write_text(json.dumps(owner()))
        sweep_orphans(folder)
    path = _path(folder, str(config[SLOT_KEY]), int(config[INDEX_KEY]))
    record = msg.content.array_records.get("arrays", ArrayRecord())
    _write(path, record.to_torch_state_dict())
    return Message(RecordDict({"metrics": MetricRecord({"chunk-tensors": len(record)})}), reply_to=msg)


def get(msg: Message, context: Context) -> Message:
    """One group of this client's update (config: index), removed here once read."""
    path = _path(chunk_folder(context), UPDATE, int(msg.content["config"][INDEX_KEY]))
    if not path.exists():
        raise ValueError(f"chunk file {path} is missing: this node holds no such group of its update")
    tensors = load_file(str(path))
    path.unlink()
    return Message(RecordDict({"arrays": ArrayRecord(tensors)}), reply_to=msg)


def drop(msg: Message, context: Context) -> Message:
    """The run is done with this node: remove its node-local folder (and the parent when empty)."""
    folder = chunk_folder(context)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()
    except OSError:  # another run's folder is still there, or it is already gone
        pass
    return Message(RecordDict({"metrics": MetricRecord({"chunk-dropped": 1})}), reply_to=msg)


def theta0(config: Mapping[str, Any], context: Context) -> Mapping[str, torch.Tensor]:
    """theta0 from its node-local groups, in the server's order: a lazy mapping whose every
    lookup maps that one tensor, unmapped when it is freed (so a client that walks the
    tensors one at a time never holds all of theta0's pages)."""
    return _read(chunk_folder(context), "theta0", int(config[THETA0_GROUPS]))


def update_limit(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> int:
    """The limit for this client's update groups: the train config's chunk-reply-bytes,
    raised to the update's largest tensor and never above chunk-bytes
    (fl_merge.round.chunks.reply_limit); chunk-bytes when the server sent no reply limit."""
    limit = int(config[LIMIT_KEY])
    if REPLY_LIMIT_KEY not in config:  # a server from before the reply limit
        return limit
    return reply_limit(limit, largest_tensor(state), int(config[REPLY_LIMIT_KEY]))


def keep_update(config: Mapping[str, Any], context: Context, state: Mapping[str, torch.Tensor],
                metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Write this client's update (weights and extras) as groups of at most `update_limit`
    bytes each; the reply's metrics, with the number of groups."""
    folder = chunk_folder(context)
    groups = chunk_groups(state, update_limit(config, state), "this client's update")
    for i, names in enumerate(groups):
        _write(_path(folder, UPDATE, i), {k: state[k] for k in names})
    return {**metrics, REPLY_GROUPS: len(groups)}


def scoring_inputs(config: Mapping[str, Any], context: Context) -> tuple[Mapping[str, torch.Tensor], list]:
    """(theta0 with this client's per-task parameters, a loader per Delta) from the node-local
    groups a score message names, all lazy (memory-mapped tensor by tensor)."""
    folder = chunk_folder(context)
    # lazy, as theta0(): this client's own parameters over theta0's where both have a name
    state = ChainMap(_read(folder, "own", int(config.get(OWN_GROUPS, 0))),
                     _read(folder, "theta0", int(config[THETA0_GROUPS])))
    counts = [int(n) for n in config[DELTA_GROUPS]]
    return state, [lambda i=i, n=n: _read(folder, f"delta-{i}", n) for i, n in enumerate(counts)]
