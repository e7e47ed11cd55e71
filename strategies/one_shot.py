"""OneShotMerge: the Flower part of a one-shot merge round (messages out, replies checked).

The round itself is a sequence of pure steps in fl_merge.round, run in order by
`strategies.merge_round.run_round`; this class only builds Flower messages, sends them with
`grid.send_and_receive`, and turns replies into ClientUpdates, score tables and named
failures (docs/protocol.md, protocol version 1):

* `train`: theta0 + the training config to every sampled node (Flower's FedAvg sampling);
  replies must hold one ArrayRecord (full weights) and one MetricRecord with num-examples.
* `score`: candidates to every usable client. A client that announced the grid capability
  in its train reply gets theta0 + its per-task parameters, each method's Delta once and the
  eta grid in ONE message; any other client gets one ordinary evaluate message per candidate
  and split (a full model in "arrays", config "split"), replying `accuracy` and `loss`.
* with `chunk_bytes` (run-config chunk-mib) both go to fl-merge's own clients as bounded
  groups of tensors and config-only messages (strategies/chunked.py).

Why `start` is not FedAvg's: FedAvg.start runs configure/aggregate callbacks per round, so a
second evaluation (test at the eta chosen on validation) had to be sent from inside
aggregate_evaluate. Here `start` (and the ServerApp) call train, then each evaluation phase,
in sequence; no message is sent from inside another callback.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fl_merge.round import coefficients as coef
from fl_merge.round.outcome import MergeRound
from fl_merge.round.settings import RoundSettings
from fl_merge.round.protocol import NUM_EXAMPLES, PROTOCOL_KEY, PROTOCOL_VERSION, SPLIT_KEY
from fl_merge.round.scoring import (
    Grids, Part, assemble_plain, candidate_state, delta_key, grid_config, parse_grid_reply, plain_answer,
    plain_requests)
from fl_merge.round.failures import no_reply_reason
from fl_merge.round.updates import ClientUpdate, MergeRoundError, failure, reported_task_name
from fl_merge.io.spill import SpillDir, split_extras_lazy
from fl_merge.merging.personal import is_personal, own_delta
from fl_merge.core.task_vectors import StateDict, split_extras
from fl_merge.round.chunks import ChunkTraffic
from .chunked import chunked_score_messages, chunked_train
from .sending import _bytes, _send, _send_each, state_record

Scores = dict[str, dict[str, Part]]  # label -> task -> split -> {"etas", "accuracy", "loss"}
# OneShotMerge's keyword arguments that are the round's settings (RoundSettings.build's)
_ROUND_KEYWORDS = frozenset(inspect.signature(RoundSettings.build).parameters) - {"cls"}


class OneShotMerge(FedAvg):
    """One-shot FL merge with any registered method(s).

    settings: the round's typed settings (fl_merge.round.settings.RoundSettings), as the
    ServerApp builds them once from the resolved run config. Without `settings`, the round's
    keyword arguments are those of `RoundSettings.build` (checked there), e.g.

    method, method_params: a name from `fl_merge.available_methods()` and its parameters.
    methods: instead of one method, a list of names or (name, params) pairs, all merged
        from the same updates and all scored; the first is the primary.
    etas: server learning rates to score (0 is always added: the pretrained base).
    test_all_etas: score the test split at every eta (else at eta 0 and the chosen eta).
    weighting: 'uniform' (p_i = 1/K, Task Arithmetic's convention) or 'num-examples'.
    merge_keys: fnmatch patterns of the merged parameter names (the rest are per-task).
    task_names: label clients by partition id in results (default: 'client-<pid>').
    measure_heterogeneity: ask clients for their gradient at theta0.
    min_clients: fewest usable updates to merge (failed clients are named and left out).
    attack_plan: who attacks how (fl_merge.round.attacks); colluding attacks run on the server.
    search: "off" (each method at its fixed params, at the shared `etas`, or at `lambdas`
        converted per method) or "paper" (each method's declared space, fl_merge.methods
        .search: its knobs x `lambdas`, default search.LAMBDAS, every candidate scored on
        validation, test only at each method's choice). A param given as a list of values is
        a grid searched with search="paper".
    lambdas: the lambda grid in each method's own paper units; None: the shared `etas`;
        "default": search.LAMBDAS with search="paper", the shared `etas` with search="off".
    learn_coefficients: "off", "task" or "block": after the choice on validation, learn
        per-vector (per-tensor) coefficients from Task Arithmetic's chosen scale in
        `coef_rounds` coefficient-only rounds (Adam, `coef_lr`) on the clients' validation
        halves, objective "supervised" (aTLAS) or "entropy" (AdaMerging); the learned model
        is one more method, "learned-<mode>" (fl_merge/round/coefficients.py).
    greedy_soup: after the choice, the greedy soup of the clients' models (fl_merge/merging/soups.py)
        as one more method, "greedy-soup" (K + up to K - 1 validation evaluations).
    spill_dir: train replies and task vectors spilled to disk there as they arrive, read
        back memory-mapped (fl_merge/io/spill.py); None keeps them in memory.
    prescreen, finalists: score every candidate on that fraction of validation first, then
        each method's `finalists` best on all of it (0: off; fl_merge/round/prescreen.py).
    ensemble: also score the ensemble of the K clients' models (mean softmax) and the best
        single one (chosen on validation): reference rows (fl_merge/round/ensemble.py).

    Any other keyword argument is FedAvg's (sampling: fraction_train, min_train_nodes, ...).
    """

    def __init__(self, method: str | None = None, method_params: dict[str, Any] | None = None, *,
                 settings: RoundSettings | None = None, **kwargs: Any) -> None:
        round_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _ROUND_KEYWORDS}
        if method is not None:
            round_kwargs["method"] = method
        if method_params is not None:
            round_kwargs["method_params"] = method_params
        if settings is not None and round_kwargs:
            raise ValueError(f"give the round's settings either as `settings` or as keyword arguments "
                             f"({', '.join(round_kwargs)}), not both")
        super().__init__(**kwargs)
        self.settings = settings if settings is not None else RoundSettings.build(**round_kwargs)
        self.outcome: MergeRound | None = None  # the last round start() ran
        self.chunks: ChunkTraffic | None = None  # a chunked round's messages (chunk_bytes > 0)

    def summary(self) -> None:
        st = self.settings
        log(INFO, "\t├──> One-shot merge: methods=%s weighting=%s search=%s %s merge-keys=%s",
            st.methods, st.weighting, st.search,
            f"lambdas={st.lambdas}" if st.lambdas is not None else f"etas={st.etas}",
            list(st.merge_keys))
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 1, timeout: float = 3600.0,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Any = None) -> Result:
        """Flower's entry point: the whole round (strategies.merge_round.run_round); the
        returned arrays are the primary method's merged model at its chosen eta (none for a
        personal primary method such as EMR: each client's model is `outcome.merged_state(eta, label, client)`)."""
        from .merge_round import run_round

        if num_rounds != 1:
            raise ValueError(f"OneShotMerge runs exactly one round, not {num_rounds}")
        if evaluate_fn is not None:
            raise ValueError("OneShotMerge has the clients score every candidate; evaluate_fn is not used, "
                             "leave it None")
        self.outcome = run_round(self, grid, initial_arrays.to_torch_state_dict(), dict(train_config or {}),
                                 dict(evaluate_config or {}), timeout)
        out = self.outcome
        if out.best_eta is None or out.personal(out.primary):  # EMR: one model per client, none shared
            return Result(arrays=ArrayRecord())
        return Result(arrays=ArrayRecord(dict(out.merged_state(out.best_eta))))

    # ------------------------------------------------------------------ train
    def train(self, grid: Grid, theta0: StateDict, config: Mapping[str, Any], timeout: float,
              spill: SpillDir | None = None) -> tuple[list[ClientUpdate], list[dict[str, Any]]]:
        """Send theta0 + `config` to the sampled nodes; (updates, failures) from the replies.
        A node that fails, never replies or sends a malformed reply is a named failure. With a
        `spill` folder each reply is spilled to disk as it arrives (its message not kept)."""
        if self.settings.chunk_bytes:  # groups of tensors, never a whole model (strategies/chunked.py)
            self.chunks = ChunkTraffic(self.settings.chunk_bytes)
            return chunked_train(self, grid, theta0, config, timeout, spill or SpillDir(), self.chunks)
        cfg = ConfigRecord({**config, PROTOCOL_KEY: PROTOCOL_VERSION,
                            "merge-keys": list(self.settings.merge_keys)})
        messages = list(self.configure_train(1, state_record(theta0), cfg, grid))

        def settle(reply: Message) -> ClientUpdate | str:
            """A train reply as a ClientUpdate (weights and extras in a spill file when the
            round spills: the message's arrays are freed as they are written), else why it
            is unusable."""
            if reply.has_error():
                return reply.error.reason
            try:
                return self.unpack(reply, spill)
            except MergeRoundError as e:
                return str(e)

        if spill is None:
            replies, elapsed = _send(grid, messages, timeout)
            sent = [(m.metadata.message_id, m.metadata.dst_node_id) for m in messages]
            settled = {mid: settle(r) for mid, r in replies.items()}
        else:
            settled, elapsed, sent = _send_each(grid, messages, timeout, settle)
        updates, failures = [], []
        for mid, node in sent:  # named by the node the message went to (an error reply's
            # source may be the SuperLink itself, answering for a lost node)
            got = settled.get(mid, no_reply_reason(elapsed, timeout))
            if isinstance(got, str):
                failures.append(failure(node, "train", got))
            else:
                updates.append(got)
        return updates, failures

    def unpack(self, msg: Message, spill: SpillDir | None = None) -> ClientUpdate:
        """A train reply as a ClientUpdate: exactly one ArrayRecord (weights, plus any
        "extra.<name>." arrays) and one MetricRecord holding num-examples, optionally a
        ConfigRecord with the client's `task-name`; errors name the node. With a `spill` folder (fl_merge.io.spill.SpillDir) the arrays go to a spill file
        and the update reads them from there (memory-mapped, the same values)."""
        content, node = msg.content, msg.metadata.src_node_id
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise MergeRoundError(
                f"node {node} replied {len(content.array_records)} ArrayRecord(s) and "
                f"{len(content.metric_records)} MetricRecord(s); expected one of each")
        metrics = dict(next(iter(content.metric_records.values())))
        if NUM_EXAMPLES not in metrics:
            raise MergeRoundError(f"node {node} sent no '{NUM_EXAMPLES}' metric")
        task = reported_task_name(content.config_records, node)
        record = next(iter(content.array_records.values()))
        if spill is None:
            state, extras = split_extras(record.to_torch_state_dict())
        else:
            state, extras = split_extras_lazy(spill.write_arrays(f"node-{node}", record))
        return ClientUpdate(node, metrics, state, extras=extras, task=task)

    # ---------------------------------------------------------------- evaluate
    def grid_message(self, client: ClientUpdate, theta0: StateDict, deltas: Mapping[str, StateDict],
                     grids: Grids, splits: Sequence[str], config: Mapping[str, Any],
                     shared: tuple[ArrayRecord, list[ArrayRecord]] | None = None) -> Message:
        """theta0 + the client's per-task parameters, each method's Delta once ("delta",
        "delta-1", ... in label order) and the etas to score each at. `shared`: theta0's and
        this client's Delta records, the shared ones made once for every client's message
        (their Arrays are shared, not copied K times; a personal method's is the client's own)."""
        cfg = ConfigRecord({**config, PROTOCOL_KEY: PROTOCOL_VERSION, "server-round": 1,
                            **grid_config(grids, splits)})
        base, records = shared or (state_record(theta0),
                                   [state_record(own_delta(deltas[m], client.identity)) for m in grids])
        content = RecordDict({
            self.arrayrecord_key: ArrayRecord({**base, **ArrayRecord(client.per_task)}),
            **{delta_key(i): ArrayRecord(dict(r)) for i, r in enumerate(records)},
            self.configrecord_key: cfg,
        })
        return Message(content=content, dst_node_id=client.node_id, message_type=MessageType.EVALUATE)

    def plain_message(self, client: ClientUpdate, state: StateDict, split: str, label: str | None,
                      eta: float, config: Mapping[str, Any]) -> Message:
        """An ordinary evaluate message: one full model, config "split" (val or test)."""
        cfg = ConfigRecord({**config, PROTOCOL_KEY: PROTOCOL_VERSION, "server-round": 1, SPLIT_KEY: split,
                            "candidate-method": label or "base", "candidate-eta": float(eta)})
        content = RecordDict({self.arrayrecord_key: ArrayRecord(state), self.configrecord_key: cfg})
        return Message(content=content, dst_node_id=client.node_id, message_type=MessageType.EVALUATE)

    def score(self, grid: Grid, clients: Sequence[ClientUpdate], theta0: StateDict,
              deltas: Mapping[str, StateDict], grids: Grids, splits: Sequence[str], phase: str,
              config: Mapping[str, Any], timeout: float, task_name: Any
              ) -> tuple[Scores, list[dict[str, Any]]]:
        """Every client scores the candidates in `grids` on `splits` (grid or plain protocol,
        all messages sent at once); (scores[label][task][split], failures of `phase`)."""
        sent: list[tuple[ClientUpdate, Message, Any]] = []
        # chunked: each Delta in groups, then config-only score messages (strategies/chunked.py)
        chunked, lost = ({}, {}) if self.chunks is None else chunked_score_messages(
            grid, [c for c in clients if c.grid_eval and c.chunked], deltas, grids, splits, config,
            self.chunks, timeout)
        base: ArrayRecord | None = None
        shared: dict[str, ArrayRecord] = {}  # a shared Delta's record, made once for every client
        for c in clients:
            if c.node_id in chunked:
                sent.append((c, chunked[c.node_id], None))
            if c.node_id in chunked or c.node_id in lost:  # lost: named below
                continue
            if c.grid_eval:
                base = base if base is not None else state_record(theta0)
                records = []  # a personal method's (EMR) Delta is the client's own, never shared
                for m in grids:
                    if is_personal(deltas[m]):
                        records.append(ArrayRecord(deltas[m].delta(c.identity)))
                        continue
                    if m not in shared:
                        shared[m] = state_record(deltas[m])
                    records.append(shared[m])
                sent.append((c, self.grid_message(c, theta0, deltas, grids, splits, config, (base, records)),
                             None))
                continue
            for req in plain_requests(grids, splits):
                label, eta, split = req
                state = candidate_state(theta0, c.per_task, own_delta(deltas[label], c.identity) if label else None,
                                        eta)
                sent.append((c, self.plain_message(c, state, split, label, eta, config), req))
        replies, elapsed = _send(grid, [m for _, m, _ in sent], timeout)
        silent = no_reply_reason(elapsed, timeout)
        scores: Scores = {m: {} for m in grids}
        failures: list[dict[str, Any]] = []
        for c in clients:  # client order, not arrival order
            if c.node_id in lost:
                failures.append(failure(c.node_id, phase, lost[c.node_id], c))
                continue
            mine = [(m, req) for cc, m, req in sent if cc is c]
            try:
                part = self._client_scores(mine, replies, grids, splits, silent)
            except MergeRoundError as e:
                failures.append(failure(c.node_id, phase, str(e), c))
                continue
            for label in grids:
                scores[label][task_name(c)] = part[label]
        for f in failures:
            log(WARNING, "no %s scores from %s: %s", phase, f["client"], f["reason"])
        if not scores[next(iter(grids))]:
            why = "; ".join(f"{f['client']}: {f['reason']}" for f in failures)
            raise MergeRoundError(f"no client returned {phase} scores: {why}")
        return scores, failures

    @staticmethod
    def _client_scores(mine: list[tuple[Message, Any]], replies: Mapping[str, Message], grids: Grids,
                       splits: Sequence[str], silent: str) -> dict[str, Part]:
        """One client's scores from its replies; MergeRoundError with the first reason
        (`silent`: why a message got no reply)."""
        answers = {}
        for m, req in mine:
            reply = replies.get(m.metadata.message_id)
            if reply is None:
                raise MergeRoundError(silent)
            if reply.has_error():
                raise MergeRoundError(reply.error.reason)
            metrics = dict(next(iter(reply.content.metric_records.values()), {}))
            try:
                if req is None:
                    return parse_grid_reply(metrics, grids, splits)
                answers[req] = plain_answer(metrics)
            except ValueError as e:
                raise MergeRoundError(str(e)) from None
        return assemble_plain(grids, splits, answers)

    # ------------------------------------------------------------ coefficients
    def coefficient_round(self, grid: Grid, clients: Sequence[ClientUpdate], theta0: StateDict,
                          task_vectors: Sequence[StateDict], coefs: Any, blocks: Sequence[Sequence[str]],
                          config: Mapping[str, Any], held: set, timeout: float) -> tuple[list, dict[str, int]]:
        """One round of the learned-coefficient phase (fl_merge/round/coefficients.py): the
        coefficients to every client (with theta0 and the task vectors to one not in `held`,
        or that replies it lost them); ([(client, gradient, score)], bytes sent/received by
        kind). A client that fails is logged and left out of this round."""
        sent_bytes = {"vectors": 0, "coefficients": 0, "replies": 0}
        answers, pending = [], list(clients)
        for attempt in range(2):
            msgs = [(c, self._coef_message(c, theta0, task_vectors, coefs, blocks, config,
                                           c.node_id not in held)) for c in pending]
            for c, m in msgs:
                sent_bytes["vectors" if c.node_id not in held else "coefficients"] += _bytes(m.content)
            (replies, _), pending = _send(grid, [m for _, m in msgs], timeout), []
            for c, m in msgs:
                reply = replies.get(m.metadata.message_id)
                if reply is None or reply.has_error():
                    log(WARNING, "coefficients: no answer from node %s", c.node_id)
                    continue
                sent_bytes["replies"] += _bytes(reply.content)
                metrics = dict(next(iter(reply.content.metric_records.values()), {}))
                if metrics.get(coef.MISSING):
                    held.discard(c.node_id)
                    pending.append(c)
                    continue
                held.add(c.node_id)
                try:
                    g, score = coef.parse_reply(metrics, coefs.shape[0], coefs.shape[1])
                except ValueError as e:
                    log(WARNING, "coefficients: node %s: %s", c.node_id, e)
                    continue
                answers.append((c, g, score))
            if not pending:
                break
        return answers, sent_bytes

    def _coef_message(self, client: ClientUpdate, theta0: StateDict, task_vectors: Sequence[StateDict],
                      coefs: Any, blocks: Sequence[Sequence[str]], config: Mapping[str, Any],
                      with_vectors: bool) -> Message:
        cfg = ConfigRecord({**config, PROTOCOL_KEY: PROTOCOL_VERSION,
                            **coef.request_config(coefs, blocks, config[coef.OBJECTIVE], with_vectors)})
        records: dict[str, Any] = {self.configrecord_key: cfg}
        if with_vectors:
            records[coef.BASE] = ArrayRecord({**state_record(theta0), **ArrayRecord(client.per_task)})
            records.update({f"{coef.VECTOR_PREFIX}{i}": state_record(tv) for i, tv in enumerate(task_vectors)})
        return Message(content=RecordDict(records), dst_node_id=client.node_id, message_type=MessageType.QUERY)


def _named_merge(name: str, method: str, doc: str) -> type[OneShotMerge]:
    """A thin OneShotMerge subclass fixed to one method (params still keyword arguments)."""

    def __init__(self: OneShotMerge, *, method_params: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        OneShotMerge.__init__(self, method=method, method_params=method_params, **kwargs)

    return type(name, (OneShotMerge,), {"__init__": __init__, "__doc__": doc})


TaskArithmeticMerge = _named_merge(
    "TaskArithmeticMerge", "task_arithmetic", "Task Arithmetic = one-shot FedAvg (eta = K*lambda).")
FedNovaMerge = _named_merge(
    "FedNovaMerge", "fednova", "One-shot FedNova: task vectors normalised by local steps.")
FedGMAMerge = _named_merge("FedGMAMerge", "fedgma", "One-shot FedGMA: sign-agreement masked mean.")
MedianMerge = _named_merge("MedianMerge", "median", "Coordinate-wise median of task vectors.")
TrimmedMeanMerge = _named_merge(
    "TrimmedMeanMerge", "trimmed_mean", "Coordinate-wise trimmed mean of task vectors.")
CClipMerge = _named_merge("CClipMerge", "cclip", "Centred clipping of task vectors.")
KrumMerge = _named_merge("KrumMerge", "krum", "Krum: the task vector closest to its neighbours.")
TiesMerge = _named_merge("TiesMerge", "ties", "TIES merging: trim, elect sign, disjoint mean.")
DareMerge = _named_merge("DareMerge", "dare", "DARE: random drop and rescale, then average.")
FisherMerge = _named_merge(
    "FisherMerge", "fisher", "Fisher merging with clients' diagonal Fisher estimates.")
