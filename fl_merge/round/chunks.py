"""Chunked messages (run-config `chunk-mib`, docs/protocol.md "Chunked messages"): a model's
tensors cut into groups of bounded size, so that no message of the round to or from one of
fl-merge's own (grid) clients carries a whole model.

`chunk_groups` decides the groups (a pure function of names, shapes and dtypes: it reads no
weights, so it runs on theta0's ``meta`` layout before any process starts); `plan_waves`
decides which group messages are in flight together, so that the SuperLink holds about one
group at a time; `ChunkTraffic` counts what the chunked round sent and received, per kind of
message, for run.json `chunking`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_merge.core.safetensors_writer import nbytes, plan_shards

MIB = 1 << 20
# How much of the task vectors a spilling round that is not chunked (spill=true alone) merges
# at once (fl_merge/round/group_merge.py).
DEFAULT_GROUP_BYTES = 256 * MIB

# Config of a chunk message (server -> client) and of the messages that refer to chunks.
SLOT_KEY = "chunk-slot"  # which node-local file set a group belongs to: theta0, delta-<i>, own, update
INDEX_KEY = "chunk-index"  # the group's position in its slot
LIMIT_KEY = "chunk-bytes"  # train config: the chunk limit (an update group never exceeds it)
# Train config, optional (protocol version 1 still; docs/protocol.md): the limit the server
# asks for the update's groups, its chunk_get replies (reply_limit); a client that ignores
# it cuts at chunk-bytes, which the server still accepts.
REPLY_LIMIT_KEY = "chunk-reply-bytes"
THETA0_GROUPS = "chunk-theta0"  # train config: how many theta0 groups the client holds
DELTA_GROUPS = "chunk-deltas"  # score config: per Delta, how many groups the client holds
OWN_GROUPS = "chunk-own"  # score config: how many groups of the client's per-task parameters
REPLY_GROUPS = "chunk-groups"  # train reply metric: how many groups the client holds of its update
# Message actions of fl-merge's own ClientApp (Flower QUERY messages "query.<action>").
PUT, GET, DROP = "chunk_put", "chunk_get", "chunk_drop"
# How many distinct groups' bytes the server lets sit in the SuperLink at once (plan_waves'
# budget, in multiples of the chunk limit): a group waits there from its push until its
# receiver confirms it (a node for chunk_put, the ServerApp for a chunk_get reply).
GROUPS_IN_FLIGHT = 1


class ChunkSizeError(ValueError):
    """A tensor does not fit one chunk: the message names it and the smallest chunk-mib."""


def chunk_limit(chunk_mib: float) -> int:
    """chunk-mib (MiB, fractions allowed) in bytes; 0 = chunking off."""
    return int(round(float(chunk_mib) * MIB))


def smallest_chunk_mib(tensor_bytes: int) -> float:
    """The smallest chunk-mib, in thousandths of a MiB, whose limit holds `tensor_bytes`."""
    return math.ceil(tensor_bytes * 1000 / MIB) / 1000


def tensor_bytes(t: torch.Tensor) -> int:
    """A tensor's data bytes from its shape and dtype (works on ``meta`` tensors)."""
    return nbytes(t.dtype, tuple(t.shape))


def largest_tensor(layout: Mapping[str, torch.Tensor]) -> int:
    """The bytes of `layout`'s largest tensor (0 for no tensors)."""
    return max((tensor_bytes(v) for v in layout.values()), default=0)


def reply_limit(limit: int, largest: int, asked: int | None = None) -> int:
    """The limit for a client's update groups (its `chunk_get` replies): `asked` (default
    half the chunk limit, rounded up), raised to `largest` (the bytes of the update's largest
    tensor) so that an update that fits today's chunks fits its replies, and never above
    `limit` (a tensor above the chunk limit fails in chunk_groups, as without a reply limit).

    Why half: each update group is a payload only its node sends, one node at a time, and it
    costs Flower's SuperLink about 1.5-2.5x its bytes while it waits there (docs/deployment.md,
    the 1.25 GiB run: 648 MiB above idle for one reply of up to 256 MiB, 0.505x the model, against a
    0.5x target); the groups every node shares (theta0, a Delta) stay at the chunk limit."""
    if limit <= 0:
        raise ValueError(f"the chunk limit must be positive, got {limit} bytes")
    if largest < 0:
        raise ValueError(f"a tensor's bytes cannot be negative, got {largest}")
    if asked is not None and asked <= 0:
        raise ValueError(f"{REPLY_LIMIT_KEY} must be a positive number of bytes, got {asked}")
    return min(limit, max(-(-limit // 2) if asked is None else asked, largest))


def chunk_groups(layout: Mapping[str, torch.Tensor], limit: int,
                 what: str = "the base model") -> list[list[str]]:
    """`layout`'s names, in its order, cut into consecutive groups of at most `limit` bytes of
    tensor data each (a group is filled until the next tensor would not fit). ChunkSizeError
    naming the largest tensor above the limit, its size and the smallest chunk-mib that
    works. No tensors: no groups."""
    if limit <= 0:
        raise ValueError(f"the chunk limit must be positive, got {limit} bytes")
    sizes = [(k, tensor_bytes(v)) for k, v in layout.items()]
    over = [(k, s) for k, s in sizes if s > limit]
    if over:
        name, size = max(over, key=lambda ks: ks[1])
        raise ChunkSizeError(
            f"chunk-mib={limit / MIB:.6g} is smaller than {what}'s tensor '{name}' ({size} bytes, "
            f"{size / MIB:.6g} MiB): set chunk-mib to at least {smallest_chunk_mib(size):g}")
    return plan_shards(sizes, limit) if sizes else []


def check_grams_fit(layout: Mapping[str, torch.Tensor], merged: list[str], limit: int) -> None:
    """A client's RegMean statistics travel in its chunked update too: one float32 Gram
    matrix [d_in, d_in] per merged 2-D weight [d_out, d_in] (clients/training.py
    gram_matrices). ChunkSizeError, before any process starts, naming the weight whose Gram
    is above the limit and the smallest chunk-mib that holds it."""
    grams = [(k, 4 * int(layout[k].shape[1]) ** 2) for k in merged if layout[k].dim() == 2]
    over = [(k, b) for k, b in grams if b > limit]
    if over:
        name, size = max(over, key=lambda kb: kb[1])
        raise ChunkSizeError(
            f"chunk-mib={limit / MIB:.6g} is smaller than the Gram matrix RegMean's clients send for "
            f"'{name}' ([{layout[name].shape[1]}, {layout[name].shape[1]}] float32, {size / MIB:.6g} MiB): "
            f"set chunk-mib to at least {smallest_chunk_mib(size):g}")


@dataclass(frozen=True)
class Transfer:
    """One group message of a round, to or from `node`: group `index` of a slot. Transfers
    whose payload is the same bytes (one state's group sent to several nodes) share
    `content`; the SuperLink stores such a payload once (Flower's object store is
    content-addressed). `nbytes`: the payload's tensor bytes (at most the chunk limit)."""

    node: int
    index: int
    content: Hashable
    nbytes: int


def plan_waves(transfers: Sequence[Transfer], budget: int) -> list[list[Transfer]]:
    """`transfers`, in their order, cut into waves (each sent and answered before the next
    is sent) whose distinct payloads (bytes counted once per `content`) add up to at most
    `budget`. A transfer whose content is already in a wave joins that wave (its bytes are
    there already); a transfer above the budget travels alone. No transfers: no waves."""
    if budget <= 0:
        raise ValueError(f"the in-flight budget must be positive, got {budget} bytes")
    waves: list[list[Transfer]] = []
    wave_of: dict[Hashable, int] = {}
    used = 0
    for t in transfers:
        if t.content in wave_of:
            waves[wave_of[t.content]].append(t)
            continue
        if not waves or used + t.nbytes > budget:
            waves.append([])
            used = 0
        waves[-1].append(t)
        wave_of[t.content] = len(waves) - 1
        used += t.nbytes
    return waves


@dataclass
class ChunkTraffic:
    """What a chunked round exchanged: per kind of message (theta0, train, update, delta,
    own, score, get, drop) the number of messages, their tensor bytes and the largest one's,
    the largest message's tensor bytes, the reply limit the train messages asked for (0
    before them), and the nodes that hold node-local files (to be told to drop them)."""

    limit: int
    messages: dict[str, int] = field(default_factory=dict)
    tensor_bytes: dict[str, int] = field(default_factory=dict)
    largest_of: dict[str, int] = field(default_factory=dict)
    largest: int = 0
    nodes: set[int] = field(default_factory=set)
    theta0_groups: int = 0  # how many groups of theta0 each chunked client holds
    reply_limit: int = 0  # REPLY_LIMIT_KEY of the train messages

    def add(self, kind: str, nbytes_: int, count: int = 1) -> None:
        self.messages[kind] = self.messages.get(kind, 0) + count
        self.tensor_bytes[kind] = self.tensor_bytes.get(kind, 0) + nbytes_ * count
        self.largest_of[kind] = max(self.largest_of.get(kind, 0), nbytes_)
        self.largest = max(self.largest, nbytes_)

    def record(self) -> dict[str, Any]:
        """run.json `chunking`."""
        return {"chunk-bytes": self.limit, "reply-bytes": self.reply_limit, "messages": dict(self.messages),
                "tensor-bytes": dict(self.tensor_bytes), "largest-tensor-bytes": dict(self.largest_of),
                "largest-message-tensor-bytes": self.largest, "nodes": len(self.nodes)}
