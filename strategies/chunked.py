"""The server's side of chunked messages (run-config `chunk-mib`, docs/protocol.md "Chunked
messages"): no message to or from one of fl-merge's own clients carries more than one group
of tensors (fl_merge.round.chunks.chunk_groups).

* train: theta0 goes to every sampled node one group at a time (`chunk_put` messages, each
  group's replies awaited before the next group is sent), then a train message with config
  only. The client replies metrics and how many groups its update has (cut at the train
  config's reply limit, about half a chunk: fl_merge.round.chunks.reply_limit); the server fetches
  each group (`chunk_get`, one message per group and client, each reply pulled on its own and
  written to that client's spill file at once), so the round reads the same memory-mapped
  update as with spill=true.
* which group messages are in flight together is fl_merge.round.chunks.plan_waves's
  decision: about one group's bytes (GROUPS_IN_FLIGHT chunks) wait in the SuperLink at a
  time. A group that every node gets (theta0, a shared Delta) is stored there once (Flower's
  object store keeps one copy of equal content) and goes to all nodes in one wave; payloads
  that differ per node (update groups, a personal method's Deltas) go one node at a time. A node that refuses the first `chunk_put` (a plain Flower
  client has no such handler) gets today's whole-model train message instead, and is
  scored as today.
* scoring: theta0 is already on the client; each Delta and the client's own per-task
  parameters go as groups, then a score message with config only.
* at the end of the round (also a failed one) every node that received a group is told to
  drop its node-local files (`chunk_drop`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_merge.io.spill import JoinedState, SpillDir, split_extras_lazy
from fl_merge.merging.personal import is_personal
from fl_merge.round.chunks import (DELTA_GROUPS, DROP, GET, GROUPS_IN_FLIGHT, INDEX_KEY, LIMIT_KEY, OWN_GROUPS,
                                   PUT, REPLY_GROUPS, REPLY_LIMIT_KEY, SLOT_KEY, THETA0_GROUPS, ChunkTraffic,
                                   Transfer, chunk_groups, largest_tensor, plan_waves, reply_limit)
from fl_merge.round.failures import no_reply_reason
from fl_merge.round.protocol import NUM_EXAMPLES, PROTOCOL_KEY, PROTOCOL_VERSION
from fl_merge.round.scoring import grid_config
from fl_merge.round.updates import ClientUpdate, MergeRoundError, failure, short_reason
from fl_merge.core.task_vectors import StateDict
from .sending import _send, _send_each, state_record

DROP_TIMEOUT = 60.0  # seconds to wait for the nodes' acknowledgements of chunk_drop


def record_bytes(record: ArrayRecord) -> int:
    """The tensor data bytes of an ArrayRecord (shapes x item sizes, no headers)."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values())


def _message(node: int, action: str, config: Mapping[str, Any], record: ArrayRecord | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord({PROTOCOL_KEY: PROTOCOL_VERSION, **config}),
                          **({"arrays": record} if record is not None else {})})
    return Message(content=content, dst_node_id=node, message_type=f"{MessageType.QUERY}.{action}")


def _reason(reply: Message | None, silent: str) -> str | None:
    """Why a reply is unusable (None when it is usable)."""
    if reply is None:
        return silent
    return short_reason(reply.error.reason) if reply.has_error() else None


def _budget(traffic: ChunkTraffic) -> int:
    return GROUPS_IN_FLIGHT * traffic.limit


def send_groups(grid: Grid, slot: str, states: Mapping[int, Mapping[str, Any]], traffic: ChunkTraffic,
                timeout: float, what: str) -> tuple[dict[int, int], dict[int, str]]:
    """Each node's state (the same object for nodes that get the same tensors: its groups are
    then made once and sent together) as `chunk_put` messages into `slot`, group after
    group, in the waves of `plan_waves` (about one group's bytes in the SuperLink at a time):
    a wave is sent and acknowledged before the next one is made. Returns ({node: number of
    groups}, {node: why it failed}); a node that fails gets no further groups."""
    plans: dict[int, list[list[str]]] = {}
    counts: dict[int, int] = {}
    for node, state in states.items():
        if id(state) not in plans:
            plans[id(state)] = chunk_groups(state, traffic.limit, what)
        counts[node] = len(plans[id(state)])
    traffic.nodes.update(states)
    transfers = [Transfer(node, i, (id(state), i), traffic.limit)
                 for i in range(max(counts.values(), default=0))
                 for node, state in states.items() if i < counts[node]]
    failed: dict[int, str] = {}
    waves = plan_waves(transfers, _budget(traffic))
    for w, wave in enumerate(waves):
        records: dict[Any, ArrayRecord] = {}  # one per content: made once, sent to each node
        sent: list[tuple[int, Message]] = []
        for t in wave:
            if t.node in failed:
                continue
            state = states[t.node]
            if t.content not in records:
                records[t.content] = ArrayRecord({k: state[k] for k in plans[id(state)][t.index]})
            sent.append((t.node, _message(t.node, PUT, {SLOT_KEY: slot, INDEX_KEY: t.index}, records[t.content])))
            traffic.add(slot.split("-")[0], record_bytes(records[t.content]))
        if not sent:
            continue
        log(INFO, "fl-merge chunks: %s wave %d/%d: group %s to node(s) %s", slot, w + 1, len(waves),
            "/".join(sorted({str(t.index) for t in wave})), " ".join(str(n) for n, _ in sent))
        replies, elapsed = _send(grid, [m for _, m in sent], timeout)
        for node, m in sent:
            why = _reason(replies.get(m.metadata.message_id), no_reply_reason(elapsed, timeout))
            if why is not None:
                failed[node] = why
    return counts, failed


def chunked_train(strategy: Any, grid: Grid, theta0: StateDict, config: Mapping[str, Any], timeout: float,
                  spill: SpillDir, traffic: ChunkTraffic) -> tuple[list[ClientUpdate], list[dict[str, Any]]]:
    """OneShotMerge.train with chunked messages (see the module's docstring): (updates,
    failures), each update's arrays in `spill` files, read back memory-mapped."""
    cfg = {**config, PROTOCOL_KEY: PROTOCOL_VERSION, "merge-keys": list(strategy.settings.merge_keys)}
    sampled = strategy.configure_train(1, ArrayRecord(), ConfigRecord(cfg), grid)  # Flower's sampling
    nodes = [m.metadata.dst_node_id for m in sampled]
    counts, refused = send_groups(grid, "theta0", {n: theta0 for n in nodes}, traffic, timeout,
                                  "the base model")
    traffic.theta0_groups = len(chunk_groups(theta0, traffic.limit))
    # the update's weights have theta0's layout; a client raises the limit to its own largest
    # tensor (a head, an extra) where that is larger (fl_merge.round.chunks.reply_limit)
    traffic.reply_limit = reply_limit(traffic.limit, largest_tensor(theta0))
    traffic.nodes -= set(refused)  # a plain client holds no files (and has no chunk_drop)
    messages = []
    for n in nodes:
        if n in refused:  # a plain client: today's whole-model message
            log(INFO, "node %s takes no chunked messages (%s): it gets whole-model messages", n, refused[n])
            record = state_record(theta0)
            traffic.add("whole-train", record_bytes(record))
            content = RecordDict({"arrays": record, "config": ConfigRecord(cfg)})
        else:
            traffic.add("train", 0)
            chunk_cfg = {THETA0_GROUPS: counts[n], LIMIT_KEY: traffic.limit,
                         REPLY_LIMIT_KEY: traffic.reply_limit}
            content = RecordDict({"config": ConfigRecord({**cfg, **chunk_cfg})})
        messages.append(Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN))

    def settle(reply: Message) -> ClientUpdate | dict[str, Any] | str:
        """A whole reply as a ClientUpdate (spilled), a chunked reply's metrics, or why unusable."""
        if reply.has_error():
            return reply.error.reason
        node = reply.metadata.src_node_id
        try:
            if node in refused:
                return strategy.unpack(reply, spill)
            return _chunked_metrics(reply)
        except MergeRoundError as e:
            return str(e)

    settled, elapsed, sent = _send_each(grid, messages, timeout, settle)
    held = {node: got for mid, node in sent if isinstance(got := settled.get(mid), dict)}
    fetched, lost = fetch_updates(grid, held, spill, traffic, timeout)
    updates, failures = [], []
    for mid, node in sent:
        got = settled.get(mid, no_reply_reason(elapsed, timeout))
        if isinstance(got, dict):
            got = lost.get(node) or fetched[node]
        if isinstance(got, str):
            failures.append(failure(node, "train", got))
        else:
            updates.append(got)
    return updates, failures


def _chunked_metrics(reply: Message) -> dict[str, Any]:
    """A chunked train reply's metrics (one MetricRecord with num-examples and chunk-groups)."""
    content, node = reply.content, reply.metadata.src_node_id
    if len(content.metric_records) != 1 or len(content.array_records) > 0:
        raise MergeRoundError(f"node {node} replied {len(content.array_records)} ArrayRecord(s) and "
                              f"{len(content.metric_records)} MetricRecord(s) to a chunked train message; "
                              "expected one MetricRecord")
    metrics = dict(next(iter(content.metric_records.values())))
    for key in (NUM_EXAMPLES, REPLY_GROUPS):
        if key not in metrics:
            raise MergeRoundError(f"node {node} sent no '{key}' metric")
    return metrics


def fetch_updates(grid: Grid, held: Mapping[int, dict[str, Any]], spill: SpillDir, traffic: ChunkTraffic,
                  timeout: float) -> tuple[dict[int, ClientUpdate], dict[int, str]]:
    """Each node's update, group by group (`chunk_get`), in the waves of `plan_waves`: every
    reply is a different payload of up to the reply limit (up to one chunk from a client that
    ignores it: so each counts as a whole chunk), so with one group's budget one node is
    asked at a time and the SuperLink holds one reply (not one per node) until the ServerApp
    pulls it and writes it to a spill file. ({node: ClientUpdate}, {node: why it failed})."""
    parts: dict[int, dict[int, Any]] = {n: {} for n in held}
    lost: dict[int, str] = {}
    transfers = [Transfer(n, i, (n, i), traffic.limit)
                 for i in range(max((int(m[REPLY_GROUPS]) for m in held.values()), default=0))
                 for n, m in held.items() if i < int(m[REPLY_GROUPS])]
    waves = plan_waves(transfers, _budget(traffic))

    written = itertools.count()

    def keep(reply: Message) -> Any:
        if reply.has_error():
            return short_reason(reply.error.reason)
        records = list(reply.content.array_records.values())
        if len(records) != 1:
            return f"replied {len(records)} ArrayRecords to chunk_get; expected one"
        traffic.add("update", record_bytes(records[0]))
        return spill.write_arrays(f"node-{reply.metadata.src_node_id}-{next(written)}", records[0])

    for w, wave in enumerate(waves):
        asked = [t for t in wave if t.node not in lost]
        if not asked:
            continue
        log(INFO, "fl-merge chunks: update wave %d/%d: group %s from node(s) %s", w + 1, len(waves),
            "/".join(sorted({str(t.index) for t in asked})), " ".join(str(t.node) for t in asked))
        messages = [_message(t.node, GET, {INDEX_KEY: t.index}) for t in asked]
        traffic.add("get", 0, len(messages))
        kept, elapsed, sent = _send_each(grid, messages, timeout, keep)
        for (mid, node), t in zip(sent, asked):
            got = kept.get(mid, no_reply_reason(elapsed, timeout))
            if node in lost:
                continue  # an earlier group of this wave failed: its reason is kept
            if isinstance(got, str):
                lost[node] = f"group {t.index} of its update: {got}"
            else:
                parts[node][t.index] = got
    updates = {}
    for node, metrics in held.items():
        if node in lost:
            continue
        try:
            state, extras = split_extras_lazy(JoinedState([parts[node][i] for i in sorted(parts[node])]))
        except Exception as e:  # a name in two groups
            lost[node] = str(e)
            continue
        updates[node] = ClientUpdate(node, metrics, state, extras=extras, chunked=True)
    return updates, lost


def chunked_score_messages(grid: Grid, clients: Sequence[ClientUpdate], deltas: Mapping[str, Any],
                           grids: Mapping[str, list[float]], splits: Sequence[str], config: Mapping[str, Any],
                           traffic: ChunkTraffic, timeout: float
                           ) -> tuple[dict[int, Message], dict[int, str]]:
    """Each Delta (a personal method's: the client's own) and each client's per-task
    parameters as groups, then per client a score message with config only: ({node: score
    message}, {node: why its groups failed})."""
    failed: dict[int, str] = {}
    delta_counts: dict[int, list[int]] = {c.node_id: [] for c in clients}
    for j, label in enumerate(grids):
        d = deltas[label]
        states = {c.node_id: d.delta(c.identity) if is_personal(d) else d
                  for c in clients if c.node_id not in failed}
        counts, lost = send_groups(grid, f"delta-{j}", states, traffic, timeout, f"the Delta of {label}")
        failed.update(lost)
        for node, n in counts.items():
            delta_counts[node].append(n)
    own, lost = send_groups(grid, "own", {c.node_id: c.per_task for c in clients if c.node_id not in failed},
                            traffic, timeout, "the per-task parameters")
    failed.update(lost)
    messages = {}
    for c in clients:
        if c.node_id in failed:
            continue
        cfg = ConfigRecord({**config, PROTOCOL_KEY: PROTOCOL_VERSION, "server-round": 1,
                            **grid_config(grids, splits), THETA0_GROUPS: traffic.theta0_groups,
                            DELTA_GROUPS: delta_counts[c.node_id],
                            OWN_GROUPS: own[c.node_id]})
        traffic.add("score", 0)
        messages[c.node_id] = Message(content=RecordDict({"config": cfg}), dst_node_id=c.node_id,
                                      message_type=MessageType.EVALUATE)
    return messages, failed


def drop_chunks(grid: Grid, traffic: ChunkTraffic) -> None:
    """Tell every node that received a group to remove its node-local files (best effort: a
    node that does not answer is logged)."""
    messages = [_message(n, DROP, {}) for n in sorted(traffic.nodes)]
    traffic.add("drop", 0, len(messages))
    replies, elapsed = _send(grid, messages, DROP_TIMEOUT)
    for m in messages:
        why = _reason(replies.get(m.metadata.message_id), no_reply_reason(elapsed, DROP_TIMEOUT))
        if why is not None:
            log(WARNING, "node %s did not drop its chunk files: %s", m.metadata.dst_node_id, why)
