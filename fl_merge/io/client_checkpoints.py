"""Checkpoint clients: a client that brings a fine-tuned checkpoint instead of training.

Where a client's checkpoint comes from: node-config ``checkpoint=<path>`` (a deployed
SuperNode) wins over entry i of run-config ``client-checkpoints`` (a comma list of K paths,
entry i for partition i; an empty entry: that client trains as usual).

What it may be: anything `fl_merge.io.checkpoints.Checkpoint` opens with ``pickles=True``: a
safetensors file, a sharded folder with its index, a Hugging Face model folder
(model.safetensors, sharded, or pytorch_model.bin) or a torch state dict (.pt/.bin,
``torch.load(weights_only=True)``).

Names (`map_names`): the checkpoint must hold every merged parameter of theta0. Its names
are taken as they are when they match; else ONE prefix rewrite is found that makes them
match, e.g. a bare Hugging Face encoder's ``embeddings.*`` -> our MiniLM's
``backbone.encoder.embeddings.*`` (TaskModel -> SentenceEncoder.encoder), or a
``bert.*`` classifier checkpoint -> the same; else one error naming a few unmatched names.
Its task head, if any, is ``head.weight/bias`` or fl-merge's merged-file
``heads.<task>.weight/bias`` (`head_keys`); without one the client fits the usual linear
probe on frozen base features, as a training client does.

Step information (`steps_for`), which FedNova needs: node-config ``checkpoint-steps`` wins
over run-config ``checkpoint-steps`` (one value or K), which wins over the checkpoint's
safetensors metadata ``local-steps`` (and optional ``fednova-a``, FedNova's ||a_i||_1).
A method that needs steps with a checkpoint client lacking them is one error before the
round (`check_step_info`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fl_merge.io.checkpoints import Checkpoint
from fl_merge.core.task_vectors import MergeInputError, one_line

NODE_CHECKPOINT = "checkpoint"  # node-config key: this node's checkpoint path
STEPS_KEY = "checkpoint-steps"  # node-config and run-config key: its local steps
META_LOCAL_STEPS = "local-steps"  # safetensors metadata keys read from a checkpoint
META_FEDNOVA_A = "fednova-a"
CHECKPOINT_METRIC = "checkpoint"  # train reply metric: 1 for a checkpoint client
HEADS_PREFIX = "heads."  # fl-merge's merged files: heads.<task>.<param>
HEAD_PREFIX = "head."
HOW_TO_GIVE_STEPS = (f"set run-config {STEPS_KEY} (one value or one per client), node-config "
                     f"{STEPS_KEY}=N, or the checkpoint's safetensors metadata '{META_LOCAL_STEPS}'")


class CheckpointClientError(ValueError):
    """A client checkpoint that cannot stand in for training (one line)."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(one_line(message), *args)


def parse_client_checkpoints(text: str, k: int, cwd: Path | None = None) -> list[str]:
    """run-config client-checkpoints -> K absolute paths ('' for a client that trains).
    Empty text: no checkpoint clients."""
    if not str(text).strip():
        return [""] * k
    items = [p.strip() for p in str(text).split(",")]
    if len(items) != k:
        raise CheckpointClientError(
            f"client-checkpoints lists {len(items)} paths for num-clients={k}: give one entry per "
            "client, comma separated (an empty entry: that client trains)")
    base = cwd or Path.cwd()
    return [str((base / Path(p).expanduser()).resolve()) if p else "" for p in items]


def parse_checkpoint_steps(text: str | int, k: int) -> list[int]:
    """run-config checkpoint-steps -> K step counts, 0 where not given. One value for all,
    or K comma-separated values (an empty entry: not given)."""
    text = str(text).strip()
    if not text:
        return [0] * k
    items = [s.strip() for s in text.split(",")]
    if len(items) not in (1, k):
        raise CheckpointClientError(f"checkpoint-steps lists {len(items)} values for num-clients={k}: "
                                    "give one value for all or one per client")
    out = [_positive_steps(s, STEPS_KEY) if s else 0 for s in items]
    return out * k if len(out) == 1 else out


def _positive_steps(value: Any, where: str) -> int:
    try:
        steps = float(value)
    except (TypeError, ValueError):
        steps = math.nan
    if not (math.isfinite(steps) and steps >= 1 and steps == int(steps)):
        raise CheckpointClientError(f"{where} must be a positive whole number of local steps, got {value!r}")
    return int(steps)


def checkpoint_for(node_config: Mapping[str, Any], paths: Sequence[str], pid: int) -> str:
    """This client's checkpoint path: node-config 'checkpoint' wins, else paths[pid]; ''
    when it has none (it trains)."""
    if str(node_config.get(NODE_CHECKPOINT, "")).strip():
        return str(Path(str(node_config[NODE_CHECKPOINT]).strip()).expanduser().resolve())
    return str(paths[pid]) if pid < len(paths) else ""


def steps_for(node_config: Mapping[str, Any], config_steps: Sequence[int], pid: int,
              metadata: Mapping[str, str]) -> dict[str, float]:
    """{'local-steps': t, 'fednova-a': a} as known for this checkpoint client (either may be
    missing): node-config checkpoint-steps, else run-config checkpoint-steps[pid] (0: not
    given), else the checkpoint's metadata. fednova-a comes from metadata only."""
    out: dict[str, float] = {}
    if str(node_config.get(STEPS_KEY, "")).strip():
        out[META_LOCAL_STEPS] = _positive_steps(node_config[STEPS_KEY], f"node-config {STEPS_KEY}")
    elif pid < len(config_steps) and int(config_steps[pid]) > 0:
        out[META_LOCAL_STEPS] = int(config_steps[pid])
    elif META_LOCAL_STEPS in metadata:
        out[META_LOCAL_STEPS] = _positive_steps(metadata[META_LOCAL_STEPS],
                                                f"checkpoint metadata '{META_LOCAL_STEPS}'")
    if META_FEDNOVA_A in metadata:
        a = float(metadata[META_FEDNOVA_A]) if _is_float(metadata[META_FEDNOVA_A]) else math.nan
        if not (math.isfinite(a) and a > 0):
            raise CheckpointClientError(f"checkpoint metadata '{META_FEDNOVA_A}' must be a positive "
                                        f"number, got {metadata[META_FEDNOVA_A]!r}")
        out[META_FEDNOVA_A] = a
    return out


def _is_float(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _rewrites(anchor: str, ckpt_keys: Sequence[str]) -> list[tuple[str, str]]:
    """(strip, add) prefix pairs under which some checkpoint key becomes `anchor`, least
    rewriting (longest shared dotted suffix) first; the identity first of all."""
    out: list[tuple[str, str]] = [("", "")]
    cuts = [0] + [i + 1 for i, ch in enumerate(anchor) if ch == "."]
    for cut in cuts:  # anchor = add + suffix, suffix starting at a name boundary
        add, suffix = anchor[:cut], anchor[cut:]
        for k in ckpt_keys:
            if k == suffix or k.endswith("." + suffix):
                pair = (k[: len(k) - len(suffix)], add)
                if pair not in out:
                    out.append(pair)
    return out


def map_names(ckpt_keys: Sequence[str], model_keys: Sequence[str], required: Sequence[str],
              role: str = "checkpoint", shown: int = 3) -> dict[str, str]:
    """model key -> checkpoint key, under the first prefix rewrite (`_rewrites`: exact names,
    else strip one prefix and add another) that finds every `required` key; the other
    model keys it finds are mapped too. CheckpointClientError naming a few unmatched names
    and a few of the checkpoint's otherwise."""
    if not required:
        raise CheckpointClientError(f"{role}: the model has no merged parameters to take from it")
    wanted = set(model_keys)
    best: tuple[int, dict[str, str]] = (-1, {})
    for strip, add in _rewrites(required[0], ckpt_keys):
        mapped = {add + k[len(strip):]: k for k in ckpt_keys if k.startswith(strip)}
        mapped = {m: k for m, k in mapped.items() if m in wanted}
        found = sum(1 for r in required if r in mapped)
        if found == len(required):
            return mapped
        if found > best[0]:
            best = (found, mapped)
    missing = [r for r in required if r not in best[1]]
    theirs = ", ".join(list(ckpt_keys)[:shown]) or "no tensors"
    raise CheckpointClientError(
        f"{role}: its tensor names do not fit the model: {len(missing)} of {len(required)} merged "
        f"parameters have no match (e.g. {', '.join(missing[:shown])}); the checkpoint has "
        f"{theirs}, ... ({len(ckpt_keys)} tensors). Save the fine-tuned model's state_dict "
        f"(names like '{required[0]}') or its bare backbone (save_pretrained)")


def head_keys(ckpt_keys: Sequence[str], task: str) -> dict[str, str]:
    """{'head.weight': key, 'head.bias': key} for a checkpoint carrying the task head
    (``heads.<task>.*`` preferred, else ``head.*``); {} when it carries none."""
    keys = set(ckpt_keys)
    for prefix in (f"{HEADS_PREFIX}{task}.", HEAD_PREFIX):
        if f"{prefix}weight" in keys:
            return {f"{HEAD_PREFIX}{p}": f"{prefix}{p}" for p in ("weight", "bias") if f"{prefix}{p}" in keys}
    return {}


def check_shapes(mapping: Mapping[str, str], ck: Checkpoint, theta0: Mapping[str, torch.Tensor],
                 role: str) -> None:
    """Every mapped tensor has theta0's shape and a float dtype (CheckpointClientError)."""
    for key, src in mapping.items():
        info = ck.info(src)
        if info.shape != tuple(theta0[key].shape):
            raise CheckpointClientError(
                f"{role}: tensor '{src}' has shape {list(info.shape)} but the model's '{key}' has "
                f"{list(theta0[key].shape)}: the checkpoint is not a fine-tune of this model")
        if theta0[key].is_floating_point() and not info.is_float:
            raise CheckpointClientError(f"{role}: tensor '{src}' is {info.dtype}, the model's "
                                        f"'{key}' is a float parameter")


def open_client_checkpoint(path: str, theta0: Mapping[str, torch.Tensor],
                           is_merged: Callable[[str], bool], role: str
                           ) -> tuple[Checkpoint, dict[str, str]]:
    """The opened checkpoint and its model key -> checkpoint key mapping, checked against
    theta0 (format, names, shapes); CheckpointClientError otherwise."""
    try:
        ck = Checkpoint(path, role, pickles=True)
    except MergeInputError as e:
        raise CheckpointClientError(str(e)) from None
    required = [k for k in theta0 if is_merged(k)]
    mapping = map_names(ck.keys, list(theta0), required, role)
    check_shapes(mapping, ck, theta0, role)
    return ck, mapping


def read_client_checkpoint(path: str, theta0: Mapping[str, torch.Tensor],
                           is_merged: Callable[[str], bool], task: str, role: str
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(weights keyed like theta0: the checkpoint's where it has them, theta0's elsewhere,
    in theta0's dtypes; its task head or {}; its metadata)."""
    ck, mapping = open_client_checkpoint(path, theta0, is_merged, role)
    with ck:
        state = {k: ck.get(mapping[k]).to(v.dtype) if k in mapping else v.clone()
                 for k, v in theta0.items()}
        head = {k: ck.get(src).float() for k, src in head_keys(ck.keys, task).items()}
        return state, head, dict(ck.metadata)


def check_step_info(methods: Sequence[str], clients: Sequence[tuple[str, bool]]) -> None:
    """A method that needs every client's local steps (registry: needs_local_steps or
    needs_normalisers, e.g. fednova) with clients (label, has steps) lacking them: one
    CheckpointClientError naming them and how to give steps."""
    from fl_merge.methods import get_method

    needy = [m for m in dict.fromkeys(methods)
             if get_method(m).needs_local_steps or get_method(m).needs_normalisers]
    lacking = [label for label, has in clients if not has]
    if needy and lacking:
        raise CheckpointClientError(
            f"method(s) {', '.join(needy)} need every client's local steps, but checkpoint "
            f"client(s) {', '.join(lacking)} have none: {HOW_TO_GIVE_STEPS}")


def check_client_checkpoints(paths: Sequence[str], steps: Sequence[int],
                             theta0: Mapping[str, torch.Tensor], is_merged: Callable[[str], bool],
                             methods: Sequence[str], tasks: Sequence[str]) -> None:
    """The server's check of run-config client checkpoints, before any client trains: each
    opens, fits theta0 (names, shapes), and gives step information where a method needs
    it. CheckpointClientError naming the client otherwise."""
    infos = []
    for pid, path in enumerate(paths):
        if not path:
            continue
        role = f"client {pid} ({tasks[pid] if pid < len(tasks) else '?'}) checkpoint {path}"
        ck, _ = open_client_checkpoint(path, theta0, is_merged, role)
        with ck:
            known = steps_for({}, steps, pid, ck.metadata)
        infos.append((f"{pid} ({path})", META_LOCAL_STEPS in known or META_FEDNOVA_A in known))
    check_step_info(methods, infos)
