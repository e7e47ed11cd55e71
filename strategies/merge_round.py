"""One merge round as a readable sequence of steps (docs/protocol.md):

train -> merge candidates -> score on validation -> choose -> test -> tables.

Each step is a function with typed inputs and outputs: the round's settings
(fl_merge.round.settings.RoundSettings), the Flower side (`Exchange`: the strategy that
builds and sends messages, the grid, the evaluate config, the timeout), the round so far
(fl_merge.round.outcome.MergeRound) and what the step before it produced. Every decision is
a pure function of fl_merge.round; no step reads the strategy's attributes, and no message
is sent from inside another step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_merge.round.failures import attribute, unscored_tasks
from fl_merge.round.candidates import (candidate_lines, candidate_methods, personal_method,
                                      plan_candidates, search_record)
from fl_merge.round.merging import (collude, fednova_note, measure, median_note, merge_arguments,
                                   merge_methods, train_requests)
from fl_merge.round.outcome import MergeRound, new_round
from fl_merge.round.prescreen import with_full_validation
from fl_merge.round.scoring import chosen_plan
from fl_merge.round.selection import Choice, apply_choice, choose_settings, edge_notes
from fl_merge.round.settings import RoundSettings
from fl_merge.round.tables import add_references, chosen_predictions, comparison_rows, reference_label
from fl_merge.round.tables import finetuned_scores, result_rows, summary_metrics
from fl_merge.io.spill import SpillDir, release_freed_memory
from fl_merge.round.updates import MergeRoundError, check_checkpoint_steps, check_enough, collect_updates
from fl_merge.core.task_vectors import StateDict
from .chunked import drop_chunks
from .ensemble_phase import ensemble_phase
from .phases import Exchange, RoundMessages, learn_phase, prescreen_phase, score_batched, soup_phase

Scores = dict[str, dict[str, Any]]  # candidate label -> task -> split -> {"etas", "accuracy", "loss"}


def phase(r: MergeRound, name: str, spilling: bool = False) -> None:
    """Log the start of a phase of round `r`: how far into the round and how long the phase
    before took (fl_merge.round.clock; benchmarks/deployment_large.py reads these markers to
    split its memory samples by phase); a spilling round (large models) also hands the last
    phase's freed message buffers back to the system."""
    if spilling:
        release_freed_memory()
    log(INFO, "%s", r.phases.mark(name))


@dataclass
class Trained:
    """What the train step leaves for the merge: the usable clients' task vectors (in
    r.clients' order, after colluding attacks) and how many nodes were asked to train."""

    task_vectors: list[StateDict]
    asked: int
    aggregate_start: float  # perf_counter when aggregation began (aggregate-seconds)


@dataclass
class Validated:
    """The validation step's scores table and each task's fine-tuned validation accuracy
    (the normalised criterion's denominator)."""

    scores: Scores
    ft_val: dict[str, float | None]


def run_round(strategy: RoundMessages, grid: Grid, theta0: StateDict, train_config: Mapping[str, Any],
              evaluate_config: Mapping[str, Any], timeout: float, r: MergeRound | None = None
              ) -> MergeRound:
    """The round, top to bottom: train -> merge candidates -> score every (setting, eta) on
    validation -> choose per method on validation (then the optional learned coefficients and
    greedy soup) -> test at each method's choice -> rows. `strategy`: a OneShotMerge (its
    settings and its messages). `r`: the round to fill (the ServerApp makes it first, so a
    failure record can report what the round had); default a new one."""
    st: RoundSettings = strategy.settings
    r = r if r is not None else new_round(st, theta0)
    x = Exchange(strategy, grid, evaluate_config, timeout,  # chunked messages need a spill folder
                 SpillDir(st.spill_dir) if st.spilling else None)
    try:
        trained = train_step(x, st, r, train_config)
        deltas = merge_step(st, r, trained)
        validated = validation_step(x, st, r, deltas)
        choice = choose_step(x, st, r, trained, validated, deltas)
        test_step(x, st, r, validated.scores, choice)
        tables_step(x, st, r, trained, validated, choice)
        return r
    except MergeRoundError as e:
        e.partial = r  # what the round had when it stopped: the ServerApp's failure.json
        r.close()  # a failed round writes no model: its kept files go now
        raise
    finally:  # spill files never outlive the round (clients' per-task parts are in memory)
        if x.spill is not None:
            x.spill.cleanup()
        if (chunks := getattr(strategy, "chunks", None)) is not None:  # nor the clients' chunk files
            try:
                drop_chunks(grid, chunks)
            except Exception as e:  # never hide why the round stopped
                log(WARNING, "could not tell the nodes to drop their chunk files: %s", e)
            r.chunking = chunks.record()


def train_step(x: Exchange, st: RoundSettings, r: MergeRound, train_config: Mapping[str, Any]) -> Trained:
    """theta0 to every client; replies become ClientUpdates and task vectors over the
    merge-key patterns (malformed or non-finite ones left out, every failure named);
    colluding attackers replace their task vectors."""
    phase(r, "train", x.spilling)
    config = {**train_config, **train_requests(st.methods, st.measure_heterogeneity)}
    updates, r.failures = x.strategy.train(x.grid, r.theta0, config, x.timeout, x.spill)
    t0 = time.perf_counter()
    phase(r, "aggregate", x.spilling)
    r.clients, task_vectors, left_out = collect_updates(updates, r.theta0, st.is_merged, x.spill)
    r.failures += left_out
    asked = len(updates) + len(r.failures) - len(left_out)  # every node sent the train message
    # One record per lost node, with its partition and task where known (by elimination).
    r.failures, r.missing_tasks = attribute(r.failures, [c.partition_id for c in r.clients], asked,
                                            r.task_names)
    for f in r.failures:
        log(WARNING, "left out %s%s (%s): %s", f["client"], f" [task {f['task']}]" if f["task"] else "",
            f["stage"], f["reason"])
    if r.missing_tasks:
        log(WARNING, "tasks missing from the results: %s", ", ".join(r.missing_tasks))
    check_enough(len(r.clients), st.min_clients, st.fixed_methods, r.failures)
    # node-config checkpoint clients are first seen here: steps where a method needs them
    check_checkpoint_steps([n for n, _ in st.methods.values()], r.clients)
    cached = sum(int(c.metrics.get("cached", 0)) for c in r.clients)
    if cached:
        log(INFO, "%d of %d clients reused a cached update (no training)", cached, len(r.clients))
    # Colluding attackers replace their task vectors (client-side attacks already happened).
    return Trained(collude(st.attack_plan, r.clients, task_vectors, asked), asked, t0)


def merge_step(st: RoundSettings, r: MergeRound, trained: Trained) -> dict[str, StateDict]:
    """Candidates: each method's knob settings (search=paper; its fixed params otherwise),
    each with its own etas; one Delta per setting (candidate label -> Delta), all from the
    same updates. No message is sent here."""
    k = len(r.clients)
    r.candidates = plan_candidates(st.methods, st.spaces, st.search, st.lambdas, st.etas, trained.task_vectors,
                                   st.lines)
    check_enough(k, st.min_clients, candidate_methods(r.candidates), r.failures)  # e.g. Krum, K < 3
    deltas = merge_methods(candidate_methods(r.candidates), r.clients, trained.task_vectors, st.weighting,
                           st.device, candidate_lines(r.candidates), theta0=r.theta0, store=r.store,
                           group_bytes=st.group_bytes)
    r.timings["aggregate-seconds"] = time.perf_counter() - trained.aggregate_start
    r.search = search_record(r.candidates, st.spaces, st.search, st.lambdas, k)
    if st.measure_heterogeneity:
        r.heterogeneity = measure(r.clients, trained.task_vectors, st.weighting)
    log(INFO, "merged %d task vectors with %s in %.2fs: %d setting(s), %d candidate(s) to score",
        k, list(st.methods), r.timings["aggregate-seconds"], len(r.candidates), r.search["candidates"])
    return deltas


def validation_step(x: Exchange, st: RoundSettings, r: MergeRound, deltas: Mapping[str, StateDict]
                    ) -> Validated:
    """Every candidate scored on validation (and on test too with test_all_etas); with a
    prescreen, on a validation subset first and each method's finalists on all of it."""
    t1 = time.perf_counter()
    phase(r, "validation", x.spilling)
    ft_val = {r.task_name(c): finetuned_scores(c)["val"] for c in r.clients}
    grids = {label: c.etas for label, c in r.candidates.items()}
    splits = ["val", "test"] if st.test_all_etas else ["val"]
    if st.prescreen.fraction:
        scores = prescreen_phase(x, st, r, deltas, grids, ft_val)
    else:
        scores, lost = score_batched(x, r.clients, r.theta0, deltas, grids, splits, "evaluation", r.task_name)
        r.failures += lost
    r.timings["validation-evaluate-seconds"] = time.perf_counter() - t1
    return Validated(scores, ft_val)


def choose_step(x: Exchange, st: RoundSettings, r: MergeRound, trained: Trained, validated: Validated,
                deltas: dict[str, StateDict]) -> Choice:
    """Per method, the (setting, eta) chosen on (whole-split) validation only; then the
    optional learned coefficients (from Task Arithmetic's choice) and greedy soup, each one
    more candidate scored on validation like any other. Fills r's choices and Deltas."""
    scores, ft_val = validated.scores, validated.ft_val
    choice, r.selection, r.notes = choose_settings(
        with_full_validation(scores), ft_val, {label: c.method for label, c in r.candidates.items()})
    if st.coefficients.mode != "off":
        learn_phase(x, st, r, trained.task_vectors, scores, deltas, ft_val, choice)
    if st.greedy_soup:
        soup_phase(x, st, r, trained.task_vectors, scores, deltas, ft_val, choice)
    apply_choice(r, choice, deltas)
    r.notes += edge_notes(choice, {label: c.etas for label, c in r.candidates.items()})
    return choice


def test_step(x: Exchange, st: RoundSettings, r: MergeRound, scores: Scores, choice: Choice) -> None:
    """Test scored at the base and each method's choice only (unless already scored with
    test_all_etas), into each chosen candidate's rows of `scores`."""
    if st.test_all_etas:
        return
    t2 = time.perf_counter()
    phase(r, "test", x.spilling)
    first = next(iter(r.candidates))
    scored = [c for c in r.clients if r.task_name(c) in scores[first]]
    test, lost = score_batched(x, scored, r.theta0, r.deltas, chosen_plan(r.best_etas), ["test"],
                               "test evaluation", r.task_name)
    r.timings["test-evaluate-seconds"] = time.perf_counter() - t2
    r.failures += lost
    for m, (label, _, _) in choice.items():
        for task in scores[label]:
            empty = {"etas": [], "accuracy": [], "loss": []}
            scores[label][task]["test"] = test[m].get(task, {}).get("test", empty)


def tables_step(x: Exchange, st: RoundSettings, r: MergeRound, trained: Trained, validated: Validated,
                choice: Choice) -> None:
    """Tidy rows (every setting's validation scores; test at the chosen one), the summary,
    the optional ensemble reference rows, within-run CIs and the final failure records."""
    scores, k = validated.scores, len(r.clients)
    by_task = {r.task_name(c): c for c in r.clients}
    for label, c in r.candidates.items():
        chosen = c.method in choice and choice[c.method][0] == label
        r.rows += result_rows(c.method, c.name, c.params, r.best_etas[c.method] if chosen else None,
                              scores[label], by_task, st.attack_plan, knobs=c.knobs,
                              lam=lambda e, c=c: c.lam(e, k), finetuned=chosen,
                              own_model=personal_method(c.name))  # EMR: each task on its own model
    r.metrics = summary_metrics(r.rows, r.best_etas, {m: ch["lambda"] for m, ch in r.choices.items()})
    # The prediction ensemble and the best single run (optional): reference models,
    # scored on val and test in one message; they change no method's choice.
    references = ensemble_phase(x, st, r, trained.task_vectors, validated.ft_val) if st.ensemble else {}
    r.metrics.update({f"{m}-test-accuracy": v for m, v in r.ensemble.get("test-accuracy", {}).items()})
    # Within-run CIs: a paired bootstrap over test examples (grid clients' test-correct),
    # on each method's chosen setting.
    chosen_scores = {m: scores[label] for m, (label, _, _) in choice.items()}
    r.predictions, missing = chosen_predictions(chosen_scores, r.best_etas)
    r.notes += missing
    r.notes += add_references(r.predictions, references)
    names = [c.name for c in r.candidates.values()]
    r.notes += fednova_note(names, [c.metrics for c in r.clients])
    r.notes += median_note(names, k, merge_arguments(r.clients, st.weighting)["weights"])
    r.comparison = comparison_rows(r.predictions, reference_label(st.methods))
    r.failures, _ = attribute(r.failures, [c.partition_id for c in r.clients], trained.asked, r.task_names)
    r.unscored_tasks = unscored_tasks(r.failures)
    if r.unscored_tasks:
        log(WARNING, "merged but not scored on test (client lost after training): %s",
            ", ".join(r.unscored_tasks))
    for note in r.notes:
        log(WARNING, "%s", note)
