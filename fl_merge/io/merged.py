"""Reading a merged model back: `load_merged(path, task)` -> a ready torch model for one task.

merged.safetensors (fl_merge/io/merged_writer.py `write_merged_model`) holds the merged
backbone under its state-dict keys (``backbone.*``), each task's head under
``heads.<task>.<param>``, and metadata naming the registered model it was built from. A model
above the run's max-shard-size is Hugging Face shards instead (``merged-00001-of-0000n.safetensors``
+ ``merged.safetensors.index.json``, every shard carrying the metadata): both layouts are read
here, given the name merged.safetensors (or the index file), one tensor at a time
(`fl_merge.io.checkpoints.Checkpoint`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from pathlib import Path

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.io.checkpoints import INDEX_SUFFIX, Checkpoint
from fl_merge.models.registry import TaskModel, build_model
from fl_merge.io.results import MERGED_METADATA_KEY

HEADS_PREFIX = "heads."


def open_merged(path: str | os.PathLike) -> Checkpoint:
    """The merged model at `path` in either layout: X.safetensors itself, else its index
    X.safetensors.index.json and shards (or `path` naming the index). A missing shard or a
    missing model is one ValueError line."""
    path = Path(path)
    index = path.with_name(path.name + ".index.json")
    where = path if path.is_file() or path.name.endswith(INDEX_SUFFIX) else index
    if not where.is_file():
        raise ValueError(f"no merged model at {path}: neither that file nor its shard index "
                         f"{index.name} exists")
    try:
        return Checkpoint(where, f"merged model {path}")
    except MergeInputError as e:
        raise ValueError(str(e)) from None


def merged_metadata_of(path: str | os.PathLike) -> dict[str, Any]:
    """The fields `write_merged_model` wrote (method, params, eta, tasks, model)."""
    with open_merged(path) as f:
        raw = f.metadata.get(MERGED_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} has no '{MERGED_METADATA_KEY}' metadata: not a merged model "
                         "written by fl-merge (fl_merge.io.merged_writer)")
    return json.loads(raw)


def load_merged(path: str | os.PathLike, task: str) -> TaskModel:
    """The merged model for `task`, in eval mode: the registered model named in the file's
    metadata, built with that task's number of classes, carrying the merged backbone and
    the task's head. Raises ValueError naming the file's tasks when `task` is not one."""
    meta = merged_metadata_of(path)
    with open_merged(path) as f:
        keys = list(f.keys)
        tasks = sorted({k[len(HEADS_PREFIX):].rpartition(".")[0] for k in keys if k.startswith(HEADS_PREFIX)})
        if task not in tasks:
            raise ValueError(f"task '{task}' is not in {path}; it holds heads for: {', '.join(tasks)}")
        if "model" not in meta:
            raise ValueError(f"{path} does not name its model (metadata has {sorted(meta)}); "
                             "it was written before fl-merge recorded it")
        head_prefix = f"{HEADS_PREFIX}{task}."
        state = {f"head.{k[len(head_prefix):]}": f.get(k) for k in keys if k.startswith(head_prefix)}
        state.update({k: f.get(k) for k in keys if not k.startswith(HEADS_PREFIX)})
    model = build_model(str(meta["model"]), int(state["head.weight"].shape[0]))
    model.load_state_dict(state)  # strict: a missing or extra key is an error
    return model.eval()
