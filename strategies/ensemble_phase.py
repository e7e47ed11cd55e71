"""The prediction-ensemble phase of a round (fl_merge/round/ensemble.py says what travels and
why): one "evaluate.ensemble" message per client, the replies turned into the two reference
models' rows ("ensemble" and "best-single") and per-example test correctness. Thin glue."""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from fl_merge.round import ensemble as ens
from fl_merge.round.outcome import MergeRound
from fl_merge.round.protocol import PROTOCOL_KEY, PROTOCOL_VERSION
from fl_merge.round.settings import RoundSettings
from fl_merge.round.tables import finetuned_scores
from fl_merge.core.task_vectors import StateDict
from .phases import Exchange
from .sending import _bytes, _send, state_record


def ensemble_phase(x: Exchange, st: RoundSettings, r: MergeRound, task_vectors: list[StateDict],
                   ft_val: Mapping[str, float | None]) -> dict[str, dict[str, dict[str, Any]]]:
    """Score the ensemble of the K clients' models and the best single one at every client;
    adds their rows and r.ensemble, and returns model label -> task -> per-example test
    correctness (empty, with a note, when no client answered)."""
    t0 = time.perf_counter()
    k = len(task_vectors)
    s = x.strategy  # its record keys: Flower's "arrays" and "config"
    cfg = ConfigRecord({**x.config, PROTOCOL_KEY: PROTOCOL_VERSION, **ens.request_config(k)})
    msgs = []
    for c in r.clients:
        content = RecordDict({s.arrayrecord_key: ArrayRecord({**state_record(r.theta0), **ArrayRecord(c.per_task)}),
                              **{f"{ens.MEMBER_PREFIX}{i}": state_record(tv) for i, tv in enumerate(task_vectors)},
                              s.configrecord_key: cfg})
        msgs.append((c, Message(content=content, dst_node_id=c.node_id,
                                message_type=f"{MessageType.EVALUATE}.{ens.ACTION}")))
    sent = sum(_bytes(m.content) for _, m in msgs)
    replies, _ = _send(x.grid, [m for _, m in msgs], x.timeout)
    parsed: dict[str, dict[str, Any]] = {}
    for c, m in msgs:
        reply = replies.get(m.metadata.message_id)
        why = ("no reply" if reply is None else reply.error.reason if reply.has_error() else None)
        if why is None:
            try:
                parsed[r.task_name(c)] = ens.parse_reply(dict(next(iter(reply.content.metric_records.values()), {})), k)
            except ValueError as e:
                why = str(e)
        if why is not None:
            log(WARNING, "ensemble: no scores from node %s: %s", c.node_id, why)
    if not parsed:
        r.notes.append("ensemble skipped: no client scored it")
        return {}
    names = [r.task_name(c) for c in r.clients]
    got = ens.outcome(parsed, {t: ft_val.get(t) for t in parsed}, names)
    by_task = {r.task_name(c): c for c in r.clients}
    common = {t: {"partition_id": by_task[t].partition_id, "node_id": by_task[t].node_id,
                  "attacker": st.attack_plan.attacks(by_task[t].partition_id)
                  if by_task[t].partition_id is not None else False,
                  **{f"finetuned-{sp}": v for sp, v in finetuned_scores(by_task[t]).items()}} for t in parsed}
    params = {ens.ENSEMBLE_LABEL: {"members": names}, ens.SINGLE_LABEL: {"member": got["best-name"]}}
    r.rows += ens.reference_rows(got["scores"], common, params)
    test = {label: {t: p["test"]["accuracy"] for t, p in per.items()} for label, per in got["scores"].items()}
    r.ensemble = {"members": names, "best-single": got["best-name"], "member-validation": got["criterion"],
                  "test-accuracy": {label: sum(v.values()) / len(v) for label, v in test.items()},
                  "bytes": {"sent": sent, "per-client": sent // max(1, len(msgs)),
                            "replies": sum(_bytes(rep.content) for rep in replies.values())},
                  "seconds": time.perf_counter() - t0}
    log(INFO, "ensemble of %d models: test %.4f; best single (%s, chosen on validation): test %.4f; "
        "%d bytes sent (%d per client: theta0 + %d task vectors)", k, r.ensemble["test-accuracy"]["ensemble"],
        got["best-name"], r.ensemble["test-accuracy"]["best-single"], sent, sent // max(1, len(msgs)), k)
    return {label: {t: p["test"]["correct"] for t, p in per.items()} for label, per in got["scores"].items()}
