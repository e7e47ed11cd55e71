"""Sending messages and collecting replies for OneShotMerge (the Flower grid calls).

`_send` is Flower's send_and_receive (every reply held until all arrived); `_send_each`
pulls each reply on its own as it arrives and keeps only what a callback makes of it
(train replies spilled to disk: fl_merge/io/spill.py), so one reply at a time is in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fl_merge.io.spill import release_freed_memory


def state_record(state: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord of any mapping of tensors: a large model's theta0, Deltas and task
    vectors are memory-mapped mappings (fl_merge/io/spill.py), which Flower's ArrayRecord
    takes only as a dict (of the mapped tensors: no copy until Flower serialises them)."""
    return ArrayRecord(state if isinstance(state, dict) else {k: state[k] for k in state})


def _bytes(content: RecordDict) -> int:
    """A message's payload: the bytes of its records (Flower's own count per record). flwr
    1.41's ConfigRecord.count_bytes raises on an empty string or list (e.g. plugins=""), so
    those entries (zero bytes of value) are left out of the count."""
    total = 0
    for rec in content.values():
        if isinstance(rec, ConfigRecord):
            rec = ConfigRecord({k: v for k, v in rec.items() if not (isinstance(v, (str, bytes, list)) and not v)})
        total += rec.count_bytes()
    return total


def _send(grid: Grid, messages: list[Message], timeout: float) -> tuple[dict[str, Message], float]:
    """grid.send_and_receive; (replies by the id of the message they answer (the grid sets
    each message's id when it pushes it), seconds the wait took)."""
    if not messages:
        return {}, 0.0
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    return {r.metadata.reply_to_message_id: r for r in replies}, time.monotonic() - t0


def _send_each(grid: Grid, messages: list[Message], timeout: float, keep: Callable[[Message], Any]
               ) -> tuple[dict[str, Any], float, list[tuple[str, int]]]:
    """Push `messages`, then pull each reply on its own as it arrives and keep only
    `keep(reply)` (e.g. a ClientUpdate whose arrays were spilled to disk), so at most one
    reply message is in memory at a time. Takes the list and empties it after the push: the
    messages' arrays are not held while waiting. Returns ({message id: kept}, seconds
    waited, [(message id, destination node)] in sending order)."""
    if not messages:
        return {}, 0.0, []
    t0 = time.monotonic()
    ids = list(grid.push_messages(messages))
    sent = [(mid or "", m.metadata.dst_node_id) for mid, m in zip(ids, messages)]
    messages.clear()
    release_freed_memory()
    kept: dict[str, Any] = {}
    pending = [mid for mid, _ in sent if mid]
    while pending and time.monotonic() - t0 < timeout:
        for mid in list(pending):
            for reply in grid.pull_messages([mid]):
                kept[reply.metadata.reply_to_message_id] = keep(reply)
                del reply
                release_freed_memory()  # the reply's buffers: back to the system now
            if mid in kept:
                pending.remove(mid)
        if pending:
            time.sleep(min(POLL_SECONDS, max(0.0, timeout - (time.monotonic() - t0))))
    return kept, time.monotonic() - t0, sent


POLL_SECONDS = 1.0  # between pulls while replies are pending (Flower's own loop waits 3 s)
