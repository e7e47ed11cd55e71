"""Attacks and merge: task vectors -> (colluding attackers) -> one Delta per method.

Also what the training message must ask for (Fisher, gradients at theta0) and the round's
heterogeneity measures: both follow from the methods and the same task vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO
from typing import Any

from flwr.common.logger import log

from fl_merge.merging.lines import ScaledState, lines_scales, lines_update
from fl_merge.merging.passes import global_statistics, has_global_pass
from fl_merge.methods import get_method, merge
from fl_merge.merging.search import check_space_params
from fl_merge.round.attacks import ATTACKS, AttackPlan
from fl_merge.round.group_merge import DEFAULT_GROUP_BYTES, groupable, keep_on_disk, merge_in_groups
from fl_merge.io.spill import SpillDir
from fl_merge.stats.heterogeneity import heterogeneity_report
from fl_merge.round.protocol import FEDNOVA_A, LOCAL_STEPS, NUM_EXAMPLES
from fl_merge.round.updates import ClientUpdate, MergeRoundError
from fl_merge.core.task_vectors import StateDict

Methods = dict[str, tuple[str, dict[str, Any]]]  # label -> (method name, full params)


def _labelled(methods: Sequence[str | tuple[str, Mapping[str, Any]]]
              ) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, name, params as given) per method: a method listed once is labelled by its
    name; one listed several times as name[k=v,...] with the params given."""
    pairs = [(m, {}) if isinstance(m, str) else (m[0], dict(m[1])) for m in methods]
    counts: dict[str, int] = {}
    for name, _ in pairs:
        counts[name] = counts.get(name, 0) + 1
    out, seen = [], set()
    for name, params in pairs:
        label = name if counts[name] == 1 else (
            f"{name}[{','.join(f'{k}={v}' for k, v in sorted(params.items()))}]")
        if label in seen:
            raise ValueError(f"method '{label}' listed twice")
        seen.add(label)
        out.append((label, name, params))
    return out


def label_methods(methods: Sequence[str | tuple[str, Mapping[str, Any]]]) -> Methods:
    """label -> (method name, full params). A method listed once is labelled by its name;
    one listed several times as name[k=v,...] with the params given. Params are checked;
    a list value (a grid searched with search=paper) is checked value by value and left out
    of the fixed params (the method's default stands there)."""
    # full parameters: results record every value used; fail before any training
    return {label: (name, check_space_params(name, params))
            for label, name, params in _labelled(methods)}


def given_params(methods: Sequence[str | tuple[str, Mapping[str, Any]]]
                 ) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (method name, the params as given, grids included): what the search reads."""
    return {label: (name, params) for label, name, params in _labelled(methods)}


def train_requests(methods: Methods, measure_heterogeneity: bool) -> dict[str, bool]:
    """Config flags for the training message: the extras the methods and measures need."""
    flags = {}
    for name, _ in methods.values():  # e.g. compute-fisher: clients add their diagonal Fisher
        flags.update({f"compute-{extra}": True for extra in get_method(name).needs.extras})
    if measure_heterogeneity:
        flags["compute-grad0"] = True  # clients add their gradient at theta0
    return flags


def collude(plan: AttackPlan, clients: Sequence[ClientUpdate], task_vectors: list[StateDict],
            num_clients: int) -> list[StateDict]:
    """Colluding attackers (e.g. ALIE) replace their task vectors together, from their own
    honest updates only (fl_merge.round.attacks); other attacks happen on the clients."""
    if plan.where != "collusion":
        return task_vectors
    idx = [i for i, c in enumerate(clients) if (c.partition_id if c.partition_id is not None else -1)
           in plan.attackers]
    if not idx:
        return task_vectors
    spec = ATTACKS[plan.attack]
    bad = spec.fn([task_vectors[i] for i in idx], num_clients, **{**spec.defaults, **plan.params})
    log(INFO, "attack %s: %d colluding client(s) replaced their updates", plan.attack, len(idx))
    return [bad if i in idx else tv for i, tv in enumerate(task_vectors)]


def merge_arguments(clients: Sequence[ClientUpdate], weighting: str) -> dict[str, Any]:
    """What merge() gets from the clients' train metrics besides the task vectors.

    weights: num-examples (weighting='num-examples') or None (uniform); local_steps: when
    every client reported local-steps; normalisers: FedNova's a_i per client (`fednova-a`,
    None where a client did not report it: merge() then falls back to its local steps, the
    plain-SGD a_i, with a warning); names: each client's run-stable identity (DARE keys its
    masks by it; errors name it). Per-client metrics a method needs are gathered here.
    """
    if weighting not in ("uniform", "num-examples"):
        raise ValueError(f"weighting must be 'uniform' or 'num-examples', got '{weighting}'")
    weights = None
    if weighting == "num-examples":
        lacking = [c.label for c in clients if NUM_EXAMPLES not in c.metrics]
        if lacking:
            raise MergeRoundError(f"weighting=num-examples but {', '.join(lacking)} sent no "
                                  f"'{NUM_EXAMPLES}' metric")
        weights = [float(c.metrics[NUM_EXAMPLES]) for c in clients]
    steps = None
    if all(LOCAL_STEPS in c.metrics for c in clients):
        steps = [float(c.metrics[LOCAL_STEPS]) for c in clients]
    normalisers = [float(c.metrics[FEDNOVA_A]) if FEDNOVA_A in c.metrics else None for c in clients]
    return {"weights": weights, "local_steps": steps,
            "normalisers": normalisers if any(a is not None for a in normalisers) else None,
            "names": [c.identity for c in clients]}


def fednova_note(method_names: Sequence[str], metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """The run's note when fednova ran and every client's FedNova normaliser is the same
    (`fednova-a`, else its local steps, the fallback merge() uses): fednova's coefficients
    p_i a_eff / a_i are then p_i, so it merges exactly fedavg's Delta and an equal score is
    by construction, not a measured tie. [] otherwise, or when a client reported neither."""
    if "fednova" not in method_names or not metrics:
        return []
    a = [m.get(FEDNOVA_A, m.get(LOCAL_STEPS)) for m in metrics]
    if any(v is None for v in a) or len({float(v) for v in a}) != 1:
        return []
    return [f"fednova = fedavg by construction: every client's FedNova normaliser is "
            f"{float(a[0]):g} (same optimizer, same local steps), so fednova's weights are "
            "fedavg's; their equal scores are not a measured tie"]


MEAN_METHODS = ("fedavg", "task_arithmetic")  # one method: the weighted mean of the task vectors


def median_note(method_names: Sequence[str], k: int, weights: Sequence[float] | None) -> list[str]:
    """The run's note when median ran on k=2 clients (`weights`: the round's p_i, None =
    uniform): the coordinate-wise median of two values is their mean, so median merges the
    unweighted mean of the two task vectors, which is fedavg's (Task Arithmetic's) Delta when
    the weights are equal. [] when median did not run or k is not 2."""
    if "median" not in method_names or k != 2:
        return []
    if weights is not None and float(weights[0]) != float(weights[1]):
        return ["median at K=2 is the unweighted mean of the two task vectors (the median of two values "
                "is their mean): fedavg with uniform weights, not this run's weighted fedavg"]
    also = [m for m in MEAN_METHODS if m in method_names]
    return ["median = fedavg by construction at K=2: the median of two values is their mean, so "
            "median merges fedavg's (Task Arithmetic's) uniform Delta"
            + (f"; its scores differ from {also[0]}'s only by their eta grids, not a measured "
               "difference" if also else "")]


def extras_for(method: str, clients: Sequence[ClientUpdate]) -> dict[str, list[StateDict]] | None:
    """The per-client extra arrays `method` needs, or a MergeRoundError naming who lacks them."""
    extras = {n: [c.extras.get(n, {}) for c in clients] for n in get_method(method).needs_extras}
    for n, per_client in extras.items():
        lacking = [c.label for c, e in zip(clients, per_client) if not e]
        if lacking:
            raise MergeRoundError(f"method '{method}' needs '{n}' from every client; "
                                  f"missing from {', '.join(lacking)}")
    return extras or None


def merge_methods(methods: Methods, clients: Sequence[ClientUpdate], task_vectors: list[StateDict],
                  weighting: str, device: str = "cpu", lines: Mapping[str, Mapping[str, Any]] | None = None,
                  theta0: StateDict | None = None, store: SpillDir | None = None,
                  group_bytes: int = DEFAULT_GROUP_BYTES) -> dict[str, StateDict]:
    """label -> Delta = fl_merge.merge(method, task_vectors, ...), all from the same updates;
    `theta0` (the round's base model) for the methods defined on the models (slerp, karcher);
    a label in `lines` gets its LiNeS-scaled update (fl_merge/merging/lines.py), each
    (method, params) merged once however many LiNeS settings scale it.

    store: large models (fl_merge/round/group_merge.py): every Delta is written there and
    returned memory-mapped; a method that is itself on groups of whole tensors, or is given
    its declared global pass's statistics (fl_merge/merging/passes.py, computed here once
    over the whole task vectors), is merged group by group (`group_bytes` of task vectors
    each), never a whole Delta in memory; its LiNeS-scaled updates too (the unscaled Delta
    on disk, its layer scales from it, alpha="auto" included, one tensor at a time, and
    each scaled tensor written as it is computed: the whole LiNeS update bit for bit)."""
    args = merge_arguments(clients, weighting)
    lines, unscaled, out = dict(lines or {}), {}, {}
    base = None
    if theta0 is not None and task_vectors:
        base = {k: theta0[k] for k in task_vectors[0] if k in theta0}

    def delta(name: str, params: dict[str, Any], tvs=task_vectors, extras=None, base=base,
              stats=None) -> StateDict:
        return merge(name, tvs, args["weights"], args["local_steps"], names=args["names"],
                     normalisers=args["normalisers"], device=device,
                     extras=extras_for(name, clients) if extras is None else extras, theta0=base,
                     **({} if stats is None else {"stats": stats}), **params)

    def merged(name: str, params: dict[str, Any], file: str) -> tuple[Any, bool]:
        """(Delta, whether it is on disk already): by groups into the store where that is
        the method itself (with its pass's statistics, computed once here), else whole."""
        if store is None or not task_vectors or not groupable(name, params):
            return delta(name, params), False
        stats = global_statistics(name, task_vectors, args["weights"], names=args["names"],
                                  device=device, **params) if has_global_pass(name, params) else None
        return merge_in_groups(
            lambda tvs, extras, b: delta(name, params, tvs, extras or None, b, stats),
            task_vectors, extras_for(name, clients), base, group_bytes, store, file), True

    for i, (label, (name, params)) in enumerate(methods.items()):
        if label not in lines:
            out[label], on_disk = merged(name, params, f"delta-{i}")
        else:  # LiNeS: one unscaled Delta per (method, params), however many settings scale it
            key = (name, repr(sorted(params.items())))
            if key not in unscaled:
                unscaled[key] = merged(name, params, f"unscaled-{i}")
            d, on_disk = unscaled[key]
            if on_disk:  # scaled as each tensor is written: never a whole Delta (exact: lines_scales)
                scales = lines_scales(name, d, lines[label], task_vectors, args["weights"], params)
                out[label] = store.write(f"delta-{i}", ScaledState(d, scales))
            else:
                out[label] = lines_update(name, d, lines[label], task_vectors, args["weights"], params)
        if store is not None and not on_disk:
            out[label] = keep_on_disk(out[label], store, f"delta-{i}")
    return out


def measure(clients: Sequence[ClientUpdate], task_vectors: list[StateDict], weighting: str
            ) -> dict[str, Any]:
    """Heterogeneity of this round (fl_merge.stats.heterogeneity.heterogeneity_report), from whatever
    the clients sent (gradients at theta0, steps and learning rates are optional)."""
    args = merge_arguments(clients, weighting)
    grads = [c.extras.get("grad0") for c in clients]
    lrs = [c.metrics.get("lr") for c in clients]
    steps = args["local_steps"]
    return heterogeneity_report(
        task_vectors, args["weights"],
        grads=grads if all(grads) else None,
        local_steps=steps,
        lrs=[float(v) for v in lrs] if steps is not None and None not in lrs else None,
    )
