"""OneShotMerge: model merging as exactly one round of federated learning.

Thin Flower glue over fl_merge: replies (full local weights + num-examples, from any
standard ClientApp) become task vectors over the merged parameters, one call to
`fl_merge.merge` per method gives its Delta, and every client scores theta0 + eta * Delta
for every method and every eta of a grid on validation in ONE evaluate message (each Delta
sent once). eta is chosen per method by mean normalized validation accuracy; a second
message then scores the test split at the base and each method's chosen eta only
(test_all_etas=True scores test at every eta in the first message instead).

Several methods in one run share the same client updates: a methods x eta table costs one
training pass.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fl_merge.aggregation import check_method_params, get_method, merge
from fl_merge.attacks import ATTACKS, AttackPlan
from fl_merge.evaluation import normalized_accuracy, select_eta
from fl_merge.metrics import heterogeneity_report
from fl_merge.models import is_merged_key
from fl_merge.results import mean
from fl_merge.task_vectors import (
    MergeInputError,
    StateDict,
    apply_update,
    split_extras,
    split_state,
    task_vector,
)


class MergeRoundError(RuntimeError):
    """The merge round cannot complete (failed clients, unusable replies)."""


@dataclass
class ClientUpdate:
    """One client's reply to the training message."""

    node_id: int
    metrics: dict[str, Any]
    state: StateDict  # full local weights as sent
    per_task: StateDict = field(default_factory=dict)  # its non-merged parameters (head)
    extras: dict[str, StateDict] = field(default_factory=dict)  # e.g. {"fisher": {...}}

    @property
    def label(self) -> str:
        pid = self.metrics.get("partition-id")
        return f"node {self.node_id}" + (f" (partition {int(pid)})" if pid is not None else "")


# Train metrics worth averaging over clients (ids and seeds are not).
_MEAN_TRAIN_METRICS = ("train-loss", "train-loss-first", "finetuned-accuracy",
                       "finetuned-val-accuracy", "local-steps", "train-seconds")


def mean_train_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Unweighted mean over clients of the metrics in _MEAN_TRAIN_METRICS they all report."""
    records = [dict(next(iter(c.metric_records.values()))) for c in contents]
    keys = [k for k in _MEAN_TRAIN_METRICS if all(k in r for r in records)]
    return MetricRecord({k: sum(float(r[k]) for r in records) / len(records) for k in keys})


class OneShotMerge(FedAvg):
    """One-shot FL merge with any registered method.

    method, method_params: a name from `fl_merge.available_methods()` and its parameters.
    methods: instead of one method, a list of names or (name, params) pairs, all merged
        from the same updates and all scored; the first is the primary (`delta`,
        `best_eta`, the returned arrays).
    etas: server learning rates to score (0 is always added: the pretrained base).
    test_all_etas: score the test split at every eta (else at eta 0 and the chosen eta).
    weighting: 'uniform' (p_i = 1/K, Task Arithmetic's convention) or 'num-examples'.
    is_merged: which parameter names are merged (the rest are per-task, never merged).
    task_names: label clients by partition id in results (default: 'client-<pid>').
    measure_heterogeneity: ask clients for their gradient at theta0 and compute
        `fl_merge.metrics.heterogeneity_report` from the round's updates (`heterogeneity`).
    min_clients: fewest usable updates to merge. A client that fails, times out or sends a
        malformed or non-finite update is left out and named (`failures`); the round
        fails only when fewer than max(min_clients, each method's minimum) remain.
    attack_plan: who attacks how (fl_merge.attacks); colluding attacks (alie) are applied
        here to the attackers' updates, the others by the clients themselves.
    """

    def __init__(
        self,
        method: str = "fedavg",
        method_params: dict[str, Any] | None = None,
        methods: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        etas: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
        test_all_etas: bool = False,
        weighting: str = "uniform",
        is_merged: Callable[[str], bool] = is_merged_key,
        device: str = "cpu",
        task_names: Sequence[str] | None = None,
        measure_heterogeneity: bool = True,
        min_clients: int = 0,
        attack_plan: AttackPlan | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", mean_train_metrics)
        super().__init__(**fedavg_kwargs)
        if methods is None:
            methods = [(method, dict(method_params or {}))]
        elif method_params:
            raise ValueError("give method_params inside `methods`, not both")
        self.methods = _label_methods(methods)  # label -> (name, params); checked here
        if not self.methods:
            raise ValueError("no merge method given")
        self.method, self.method_params = next(iter(self.methods.values()))
        self.etas = sorted({0.0, *map(float, etas)})
        self.test_all_etas = test_all_etas
        if weighting not in ("uniform", "num-examples"):
            raise ValueError(f"weighting must be 'uniform' or 'num-examples', got '{weighting}'")
        self.weighting = weighting
        self.is_merged = is_merged
        self.device = device
        self.task_names = list(task_names) if task_names is not None else None
        self.measure_heterogeneity = measure_heterogeneity
        self.min_clients = min_clients
        self.attack_plan = attack_plan or AttackPlan()
        self.failures: list[dict[str, Any]] = []  # clients left out: who, at which stage, why
        self._train_nodes: list[int] = []
        # Filled in by the round, read by callers after start().
        self.theta0: StateDict = {}
        self.clients: list[ClientUpdate] = []
        self.deltas: dict[str, StateDict] = {}  # method label -> Delta
        self.best_etas: dict[str, float] = {}  # method label -> chosen eta
        self.rows: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.heterogeneity: dict[str, Any] = {}  # fl_merge.metrics.heterogeneity_report
        # The test-phase evaluate message goes out from aggregate_evaluate: keep what it needs.
        self._grid: Grid | None = None
        self._evaluate_config = ConfigRecord()
        self._timeout: float = 3600.0

    @property
    def primary(self) -> str:
        return next(iter(self.methods))

    @property
    def delta(self) -> StateDict:
        """The primary method's Delta."""
        return self.deltas.get(self.primary, {})

    @property
    def best_eta(self) -> float | None:
        """The primary method's chosen eta."""
        return self.best_etas.get(self.primary)

    def summary(self) -> None:
        log(INFO, "\t├──> One-shot merge: methods=%s weighting=%s etas=%s",
            self.methods, self.weighting, self.etas)
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 1,
              *args: Any, **kwargs: Any) -> Result:
        if num_rounds != 1:
            raise ValueError(f"OneShotMerge runs exactly one round, not {num_rounds}")
        self._timeout = float(kwargs.get("timeout", args[0] if args else 3600.0))
        result = super().start(grid, initial_arrays, 1, *args, **kwargs)
        if self.best_eta is not None:
            result.arrays = ArrayRecord(self.merged_state(self.best_eta))
        return result

    def merged_state(self, eta: float, method: str | None = None) -> StateDict:
        """theta0 + eta * Delta (of `method`, a label; default the primary)."""
        return apply_update(self.theta0, self.deltas[method or self.primary], eta)

    def task_name(self, client: ClientUpdate) -> str:
        pid = client.metrics.get("partition-id")
        if pid is None:
            return f"node-{client.node_id}"
        pid = int(pid)
        if self.task_names is not None and pid < len(self.task_names):
            return self.task_names[pid]
        return f"client-{pid}"

    # ---------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.theta0 = {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
        config = ConfigRecord(dict(config))
        if any("fisher" in get_method(name).needs_extras for name, _ in self.methods.values()):
            config["compute-fisher"] = True  # clients add their diagonal Fisher to the reply
        if self.measure_heterogeneity:
            config["compute-grad0"] = True  # clients add their gradient at theta0
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._train_nodes = [m.metadata.dst_node_id for m in messages]  # to name who never replies
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # Flower's own consistency check names no node; ours below does (see _unpack).
        valid, failed = self._check_and_log_replies(replies, is_train=True, validate=False)
        self.failures = [self._failure(m.metadata.src_node_id, "train", m.error.reason) for m in failed]
        replied = {m.metadata.src_node_id for m in replies}
        self.failures += [self._failure(n, "train", f"no reply within the round timeout ({self._timeout:g}s)")
                          for n in self._train_nodes if n not in replied]
        t0 = time.perf_counter()
        merged_keys = [k for k in self.theta0 if self.is_merged(k)]
        if not merged_keys:
            raise MergeRoundError("the initial model has no merged parameters")
        clients: list[ClientUpdate] = []
        task_vectors: list[StateDict] = []
        # Deterministic order (partition id, else node id): merge results never depend on
        # which reply arrived first. A malformed or non-finite update is left out, named.
        for c in sorted(self._unpack_all(valid), key=lambda c: (c.metrics.get("partition-id", math.inf),
                                                                 c.node_id)):
            try:
                tv = task_vector(c.state, self.theta0, merged_keys)
            except MergeInputError as e:
                self.failures.append(self._failure(c.node_id, "train", f"malformed update: {e}", c))
                continue
            bad = [k for k, v in tv.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                self.failures.append(self._failure(c.node_id, "train", f"non-finite update in {bad[0]}", c))
                continue
            _, c.per_task = split_state(c.state, self.is_merged)
            clients.append(c)
            task_vectors.append(tv)
        for f in self.failures:
            log(WARNING, "left out %s (%s): %s", f["client"], f["stage"], f["reason"])
        self._check_enough(len(clients))
        if self.attack_plan.where == "collusion":
            task_vectors = self._collude(clients, task_vectors)
        weights = None
        if self.weighting == "num-examples":
            weights = [float(c.metrics[self.weighted_by_key]) for c in clients]
        steps = None
        if all("local-steps" in c.metrics for c in clients):
            steps = [float(c.metrics["local-steps"]) for c in clients]
        names = [c.label for c in clients]
        self.deltas = {}
        for label, (name, params) in self.methods.items():
            extras = self._extras_for(name, clients)
            self.deltas[label] = merge(name, task_vectors, weights, steps, names=names,
                                       device=self.device, extras=extras, **params)
        self.clients = clients
        self.timings["aggregate-seconds"] = time.perf_counter() - t0
        if self.measure_heterogeneity:
            self.heterogeneity = self._measure(clients, task_vectors, weights, steps)
        cached = sum(int(c.metrics.get("cached", 0)) for c in clients)
        if cached:
            log(INFO, "aggregate_train: %d of %d clients reused a cached update (no training)",
                cached, len(clients))
        log(INFO, "aggregate_train: merged %d task vectors with %s in %.2fs",
            len(clients), list(self.methods), self.timings["aggregate-seconds"])
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(self.merged_state(1.0)), metrics

    @staticmethod
    def _measure(clients: list[ClientUpdate], task_vectors: list[StateDict],
                 weights: list[float] | None, steps: list[float] | None) -> dict[str, Any]:
        """Heterogeneity of this round, from whatever the clients sent (gradients at theta0,
        steps and learning rates are optional)."""
        grads = [c.extras.get("grad0") for c in clients]
        lrs = [c.metrics.get("lr") for c in clients]
        return heterogeneity_report(
            task_vectors, weights,
            grads=grads if all(grads) else None,
            local_steps=steps,
            lrs=[float(v) for v in lrs] if steps is not None and None not in lrs else None,
        )

    @staticmethod
    def _extras_for(method: str, clients: list[ClientUpdate]) -> dict[str, list[StateDict]] | None:
        """The per-client extra arrays `method` needs, or a MergeRoundError naming who lacks them."""
        extras = {n: [c.extras.get(n, {}) for c in clients] for n in get_method(method).needs_extras}
        for n, per_client in extras.items():
            lacking = [c.label for c, e in zip(clients, per_client) if not e]
            if lacking:
                raise MergeRoundError(f"method '{method}' needs '{n}' from every client; "
                                      f"missing from {', '.join(lacking)}")
        return extras or None

    def _unpack(self, msg: Message) -> ClientUpdate:
        """A reply as a ClientUpdate: exactly one ArrayRecord (weights, plus any
        "extra.<name>." arrays) and one MetricRecord; errors name the node."""
        content, node = msg.content, msg.metadata.src_node_id
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise MergeRoundError(
                f"node {node} replied {len(content.array_records)} ArrayRecord(s) and "
                f"{len(content.metric_records)} MetricRecord(s); expected one of each")
        state, extras = split_extras(next(iter(content.array_records.values())).to_torch_state_dict())
        metrics = dict(next(iter(content.metric_records.values())))
        if self.weighting == "num-examples" and self.weighted_by_key not in metrics:
            raise MergeRoundError(f"node {node} sent no '{self.weighted_by_key}' metric")
        return ClientUpdate(node, metrics, state, extras=extras)

    def _unpack_all(self, valid: list[Message]) -> list[ClientUpdate]:
        out = []
        for msg in valid:
            try:
                out.append(self._unpack(msg))
            except MergeRoundError as e:
                self.failures.append(self._failure(msg.metadata.src_node_id, "train", str(e)))
        return out

    def _failure(self, node_id: int, stage: str, reason: str,
                 client: ClientUpdate | None = None) -> dict[str, Any]:
        """A failure record naming the client (node id, and partition id when known)."""
        client = client or next((c for c in self.clients if c.node_id == node_id), None)
        label = client.label if client is not None else f"node {node_id}"
        pid = client.metrics.get("partition-id") if client is not None else None
        return {"client": label, "node_id": node_id, "partition_id": pid, "stage": stage,
                "reason": _short_reason(reason)}

    def _check_enough(self, usable: int) -> None:
        """Merge with the usable clients if there are at least min_clients of them and every
        method's own minimum (e.g. krum: 2f+3); else one error naming every failure."""
        why = "; ".join(f"{f['client']}: {f['reason']}" for f in self.failures) or "none failed"
        if usable == 0 or usable < self.min_clients:
            raise MergeRoundError(f"only {usable} usable client update(s), need at least "
                                  f"{max(self.min_clients, 1)} (min-clients); failures: {why}")
        for label, (name, params) in self.methods.items():
            try:
                check_method_params(name, params, usable)
            except MergeInputError as e:
                raise MergeRoundError(f"method '{label}' cannot merge the {usable} usable client "
                                      f"update(s): {e}; failures: {why}") from None

    def _collude(self, clients: list[ClientUpdate], task_vectors: list[StateDict]) -> list[StateDict]:
        """Colluding attackers (e.g. ALIE) replace their task vectors together, from their
        own honest updates only (fl_merge.attacks)."""
        plan = self.attack_plan
        idx = [i for i, c in enumerate(clients) if int(c.metrics.get("partition-id", -1)) in plan.attackers]
        if not idx:
            return task_vectors
        spec = ATTACKS[plan.attack]
        bad = spec.fn([task_vectors[i] for i in idx], len(self._train_nodes) or len(clients),
                      **{**spec.defaults, **plan.params})
        log(INFO, "attack %s: %d colluding client(s) replaced their updates", plan.attack, len(idx))
        return [bad if i in idx else tv for i, tv in enumerate(task_vectors)]

    # ------------------------------------------------------------- evaluate
    @property
    def _first_splits(self) -> list[str]:
        return ["val", "test"] if self.test_all_etas else ["val"]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """One message per trained client: theta0 with its own per-task parameters, each
        method's Delta once (ArrayRecords "delta", "delta-1", ... in `delta-methods` order),
        and the eta grid."""
        self._grid, self._evaluate_config = grid, ConfigRecord(dict(config))
        if not self.clients:
            return []
        return self._evaluate_messages(server_round, config, {m: self.etas for m in self.deltas},
                                       self._first_splits)

    def _evaluate_messages(self, server_round: int, config: ConfigRecord, grids: dict[str, list[float]],
                           splits: list[str], clients: list[ClientUpdate] | None = None) -> list[Message]:
        """Per client: theta0 + its head, every Delta, and the etas to score each Delta at."""
        labels = list(self.deltas)
        delta_records = {_delta_key(i): ArrayRecord(self.deltas[m]) for i, m in enumerate(labels)}
        messages = []
        for c in self.clients if clients is None else clients:
            cfg = ConfigRecord(dict(config))
            cfg["etas"] = [e for m in labels for e in grids[m]]
            cfg["etas-per-delta"] = [len(grids[m]) for m in labels]
            cfg["splits"] = list(splits)
            cfg["delta-methods"] = labels
            cfg["server-round"] = server_round
            content = RecordDict({
                self.arrayrecord_key: ArrayRecord({**self.theta0, **c.per_task}),
                **delta_records,
                self.configrecord_key: cfg,
            })
            messages.append(Message(content=content, dst_node_id=c.node_id,
                                    message_type=MessageType.EVALUATE))
        return messages

    def _scores(self, replies: Iterable[Message], grids: dict[str, list[float]], splits: list[str],
                phase: str, clients: list[ClientUpdate] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """scores[label][task][split] = {"etas", "accuracy", "loss"} from the replies, whose
        lists run method-major over each method's grid; errors name the node."""
        replies = list(replies)
        valid, failed = self._check_and_log_replies(replies, is_train=False)
        lost = [self._failure(m.metadata.src_node_id, phase, m.error.reason) for m in failed]
        by_node = {m.metadata.src_node_id: dict(next(iter(m.content.metric_records.values())))
                   for m in valid}
        labels = list(self.deltas)
        total = sum(len(grids[m]) for m in labels)
        scores: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in labels}
        failed_nodes = {f["node_id"] for f in lost}
        for client in self.clients if clients is None else clients:  # client order, not arrival order
            metrics = by_node.get(client.node_id)
            if client.node_id in failed_nodes:
                continue
            if metrics is None or any(len(metrics.get(f"{s}-accuracy", [])) != total for s in splits):
                lost.append(self._failure(client.node_id, phase, (
                    "no reply within the round timeout" if metrics is None else
                    f"did not score the methods x eta grid (no {'/'.join(f'{s}-accuracy' for s in splits)}"
                    " per method and eta)"), client))
                continue
            start = 0
            for label in labels:
                n, part = len(grids[label]), {}
                for split in splits:
                    part[split] = {"etas": list(grids[label]), **{
                        k: [float(v) for v in list(metrics[f"{split}-{k}"])[start:start + n]]
                        for k in ("accuracy", "loss")}}
                scores[label][self.task_name(client)] = part
                start += n
        for f in lost:
            log(WARNING, "no %s scores from %s: %s", phase, f["client"], f["reason"])
        self.failures += lost
        if not scores[labels[0]]:
            why = "; ".join(f"{f['client']}: {f['reason']}" for f in lost)
            raise MergeRoundError(f"no client returned {phase} scores: {why}")
        return scores

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Choose each method's eta on validation; unless test_all_etas, score the test split
        at eta 0 and the chosen etas in a second message; build the tidy rows."""
        labels = list(self.deltas)
        grids = {m: self.etas for m in labels}
        scores = self._scores(replies, grids, self._first_splits, "evaluation")
        by_task = {self.task_name(c): c for c in self.clients}
        for label in labels:
            ft_val = {t: float(by_task[t].metrics["finetuned-val-accuracy"]) for t in scores[label]}
            val_acc = {t: s["val"]["accuracy"] for t, s in scores[label].items()}
            self.best_etas[label], _ = select_eta(self.etas, val_acc, ft_val)
        if not self.test_all_etas:
            if self._grid is None:
                raise MergeRoundError("aggregate_evaluate before configure_evaluate: no grid")
            test_grids = {m: [0.0, self.best_etas[m]] for m in labels}
            scored = [c for c in self.clients if self.task_name(c) in scores[labels[0]]]
            messages = self._evaluate_messages(server_round, self._evaluate_config, test_grids, ["test"],
                                               scored)
            t0 = time.perf_counter()
            test = self._scores(self._grid.send_and_receive(messages, timeout=self._timeout),
                                test_grids, ["test"], "test evaluation", scored)
            self.timings["test-evaluate-seconds"] = time.perf_counter() - t0
            for label in labels:
                for task, part in test[label].items():
                    scores[label][task].update(part)
                for task in set(scores[label]) - set(test[label]):
                    scores[label][task]["test"] = {"etas": [], "accuracy": [], "loss": []}
        self.rows = []
        for label in labels:
            self.rows += self._rows(label, scores[label], by_task)
        out: dict[str, float] = {}
        test_rows = [r for r in self.rows if r["split"] == "test"]
        for label in labels:
            merged = [r for r in test_rows if r["method"] == label and r["model"] == "merged" and r["selected"]]
            out[f"{label}-eta"] = self.best_etas[label]
            out[f"{label}-test-accuracy"] = mean([r["accuracy"] for r in merged])
            out[f"{label}-normalized-accuracy"] = mean([r["normalized_accuracy"] for r in merged])
        first = [r for r in test_rows if r["method"] == labels[0]]
        out["base-test-accuracy"] = mean([r["accuracy"] for r in first if r["model"] == "base"])
        out["finetuned-test-accuracy"] = mean([r["accuracy"] for r in first if r["model"] == "finetuned"])
        return MetricRecord(out)

    def _rows(self, label: str, scores: dict[str, dict[str, Any]],
              by_task: dict[str, ClientUpdate]) -> list[dict[str, Any]]:
        """Tidy rows: one per (model, eta, task, split) scored. model is base (eta 0),
        finetuned (the client's own model) or merged (eta > 0; `selected` marks the chosen
        eta)."""
        name, params = self.methods[label]
        params_json = json.dumps(params, sort_keys=True)
        best = self.best_etas[label]
        rows = []
        for task, s in scores.items():
            c = by_task[task]
            pid = c.metrics.get("partition-id")
            common = {"method": label, "method_name": name, "params": params_json, "task": task,
                      "partition_id": pid, "node_id": c.node_id,
                      "attacker": self.attack_plan.attacks(int(pid)) if pid is not None else False}
            ft = {"val": float(c.metrics["finetuned-val-accuracy"]),
                  "test": float(c.metrics["finetuned-accuracy"])}
            for split in ("val", "test"):
                rows.append({**common, "model": "finetuned", "eta": float("nan"), "selected": False,
                             "split": split, "accuracy": ft[split],
                             "loss": float(c.metrics["finetuned-loss"]) if split == "test" else float("nan"),
                             "finetuned_accuracy": ft[split], "normalized_accuracy": 1.0})
                got = s[split]
                for eta, acc, loss in zip(got["etas"], got["accuracy"], got["loss"]):
                    rows.append({**common, "model": "base" if eta == 0 else "merged", "eta": eta,
                                 "selected": eta == best, "split": split,
                                 "accuracy": acc, "loss": loss,
                                 "finetuned_accuracy": ft[split],
                                 "normalized_accuracy": normalized_accuracy(acc, ft[split])})
        return rows


def _short_reason(reason: str) -> str:
    """The exception line of a client's error (Flower/Ray wrap it in a whole traceback)."""
    lines = [line.strip() for line in str(reason).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else "unknown error"
    return lines[-1].removesuffix("'>").strip()


def _delta_key(i: int) -> str:
    return "delta" if i == 0 else f"delta-{i}"


def _label_methods(methods: Sequence[str | tuple[str, dict[str, Any]]]
                   ) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (method name, full params). A method listed once is labelled by its name;
    one listed several times as name[k=v,...] with the params given. Params are checked."""
    pairs = [(m, {}) if isinstance(m, str) else (m[0], dict(m[1])) for m in methods]
    counts: dict[str, int] = {}
    for name, _ in pairs:
        counts[name] = counts.get(name, 0) + 1
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, params in pairs:
        full = check_method_params(name, params)  # fail before any training
        label = name if counts[name] == 1 else (
            f"{name}[{','.join(f'{k}={v}' for k, v in sorted(params.items()))}]")
        if label in out:
            raise ValueError(f"method '{label}' listed twice")
        out[label] = (name, full)  # full parameters: results record every value used
    return out


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
