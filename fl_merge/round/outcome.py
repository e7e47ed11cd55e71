"""MergeRound: everything one round produced (what results files and tests read)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fl_merge.round.clock import PhaseClock
from fl_merge.round.updates import ClientUpdate
from fl_merge.core.task_vectors import StateDict, UpdatedState, apply_update
from fl_merge.io.mapped_base import SourceState
from fl_merge.io.spill import SpillDir
from fl_merge.merging.personal import is_personal, own_delta

if TYPE_CHECKING:
    from fl_merge.round.settings import RoundSettings


@dataclass
class MergeRound:
    methods: dict[str, tuple[str, dict[str, Any]]]  # label -> (method name, full params)
    etas: list[float]
    task_names: list[str] | None = None  # partition id -> task name
    theta0: StateDict = field(default_factory=dict)
    clients: list[ClientUpdate] = field(default_factory=list)  # usable, in partition-id order
    deltas: dict[str, Any] = field(default_factory=dict)  # label -> Delta (PersonalDeltas: per client)
    best_etas: dict[str, float] = field(default_factory=dict)  # label -> eta chosen on val
    selection: str = ""  # the criterion eta was chosen by
    rows: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # summary (tables.summary_metrics)
    failures: list[dict[str, Any]] = field(default_factory=list)  # clients left out: who, where, why
    missing_tasks: list[str] = field(default_factory=list)  # tasks with no usable update
    unscored_tasks: list[str] = field(default_factory=list)  # merged, client lost before test
    heterogeneity: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    phases: PhaseClock = field(default_factory=PhaseClock)  # started with the round: phase lines
    notes: list[str] = field(default_factory=list)  # degraded protocol, e.g. missing metrics
    # The search (fl_merge.round.candidates): every candidate scored on validation, and per
    # method its choice {"candidate", "knobs", "lambda", "eta", "validation"}.
    candidates: dict[str, Any] = field(default_factory=dict)  # candidate label -> Candidate
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)  # run.json's record (search_record)
    # model (method label or "base") -> task -> 0/1 per test example, at the chosen eta
    predictions: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    comparison: list[dict[str, Any]] = field(default_factory=list)  # tables.comparison_rows
    # The learned-coefficient phase (fl_merge/round/coefficients.py), when it ran: mode,
    # objective, the coefficients, per-round validation history and bytes sent.
    coefficients: dict[str, Any] = field(default_factory=dict)
    # The greedy soup (fl_merge/merging/soups.py), when it ran: own validation scores, members, history.
    soup: dict[str, Any] = field(default_factory=dict)
    # The prediction ensemble (fl_merge/round/ensemble.py), when it ran: members, the best
    # single run chosen on validation, test accuracies, bytes sent.
    ensemble: dict[str, Any] = field(default_factory=dict)
    # Chunked messages (run-config chunk-mib, fl_merge/round/chunks.py), when on: messages and
    # tensor bytes per kind, the largest message's tensor bytes.
    chunking: dict[str, Any] = field(default_factory=dict)
    # Large models (run-config spill or chunk-mib): the folder that holds theta0 and every
    # Delta as memory-mapped files until the results are written (`close`).
    store: SpillDir | None = None

    @property
    def primary(self) -> str:
        return next(iter(self.methods))

    @property
    def method(self) -> str:
        return self.methods[self.primary][0]

    @property
    def method_params(self) -> dict[str, Any]:
        return self.methods[self.primary][1]

    @property
    def delta(self) -> StateDict:
        """The primary method's Delta."""
        return self.deltas.get(self.primary, {})

    @property
    def best_eta(self) -> float | None:
        """The primary method's chosen eta."""
        return self.best_etas.get(self.primary)

    def personal(self, method: str | None = None) -> bool:
        """Whether `method` (a label; default the primary) gives each client its own model
        (a personal method such as EMR: its Delta is a PersonalDeltas)."""
        return is_personal(self.deltas.get(method or self.primary))

    def merged_state(self, eta: float, method: str | None = None, client: ClientUpdate | None = None
                     ) -> StateDict:
        """theta0 + eta * Delta (of `method`, a label; default the primary). A personal
        method (EMR) has no one merged model: `client`'s own, theta0 + eta * Delta_i, and
        without a client a ValueError saying so."""
        label = method or self.primary
        if self.personal(label) and client is None:
            raise ValueError(f"method '{label}' gives each client its own model, not one merged "
                             "model: merged_state(eta, method, client) is that client's")
        delta = self.deltas[label] if client is None else own_delta(self.deltas[label], client.identity)
        if self.store is not None:  # large models: computed one tensor at a time when read
            return UpdatedState(self.theta0, delta, eta)
        return apply_update(self.theta0, delta, eta)

    def close(self) -> None:
        """Remove the files the round kept on disk (theta0 and Deltas of a large model); the
        round's Deltas cannot be read after this."""
        if self.store is not None:
            self.store.cleanup()

    def task_name(self, client: ClientUpdate) -> str:
        """The client's own `task-name` when it replied one, else tasks[partition id],
        'client-<pid>' beyond the list, 'node-<id>' without an id."""
        if client.task is not None:
            return client.task
        pid = client.partition_id
        if pid is None:
            return f"node-{client.node_id}"
        if self.task_names is not None and pid < len(self.task_names):
            return self.task_names[pid]
        return f"client-{pid}"


def new_round(settings: RoundSettings, theta0: StateDict) -> MergeRound:
    """An empty round for `settings`: its methods
    (a copy: the round records each method's chosen setting there), etas, task names and
    theta0. theta0 is never modified: a small model's is cloned; a large model's (the round
    spills or chunks) is written to the round's `store` and read back memory-mapped, one
    tensor at a time, so the ServerApp holds no copy of it between messages; one already
    memory-mapped from its source's own files (`fl_merge.io.mapped_base.SourceState`) is
    kept as it is, never copied."""
    r = MergeRound(methods=dict(settings.methods), etas=list(settings.etas), task_names=settings.task_names)
    if not settings.spilling:
        r.theta0 = {k: v.detach().clone() for k, v in theta0.items()}
        return r
    r.store = SpillDir(settings.spill_dir)
    if isinstance(theta0, SourceState):  # memory-mapped where it lies already
        r.theta0 = theta0
    else:
        r.theta0 = dict(theta0) if not theta0 else r.store.write("theta0", theta0)
    return r
