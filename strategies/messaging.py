"""Sending a batch of messages and counting their bytes: shared by the round's phases
(strategies/one_shot.py, strategies/ensemble_phase.py)."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid


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
