"""One merge round as a readable sequence of steps.

Each step is either Flower's part (OneShotMerge.train / OneShotMerge.score: messages out,
replies checked) or a pure function of fl_merge.round; they run strictly in this order, and
no message is sent from inside another step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_merge.round.failures import attribute, unscored_tasks
from fl_merge.round.candidates import candidate_methods, plan_candidates, search_record
from fl_merge.round.merging import collude, measure, merge_methods, train_requests
from fl_merge.round.outcome import MergeRound
from fl_merge.round.prescreen import with_full_validation
from fl_merge.round.scoring import chosen_plan
from fl_merge.round.selection import choose_settings
from fl_merge.round.tables import add_references, chosen_predictions, comparison_rows, reference_label
from fl_merge.round.tables import finetuned_scores, result_rows, summary_metrics
from fl_merge.io.spill import SpillDir, release_freed_memory
from fl_merge.round.updates import MergeRoundError, check_checkpoint_steps, check_enough, collect_updates
from fl_merge.core.task_vectors import StateDict
from .ensemble_phase import ensemble_phase
from .phases import learn_phase, prescreen_phase, score_batched, soup_phase


def phase(s: Any, name: str) -> None:
    """Log the start of a phase with its wall-clock time (benchmarks/deployment_large.py
    reads these markers to split its memory samples by phase); a spilling round (large
    models) also hands the last phase's freed message buffers back to the system."""
    if s.spill_dir is not None:
        release_freed_memory()
    log(INFO, "fl-merge phase %s t=%.3f", name, time.time())


def run_round(strategy: Any, grid: Grid, theta0: StateDict, train_config: Mapping[str, Any],
              evaluate_config: Mapping[str, Any], timeout: float) -> MergeRound:
    """train -> collect -> attacks -> candidates (each method's knob settings, one Delta each)
    -> score every (setting, eta) on val -> choose per method on val -> score test at each
    method's choice -> rows. `strategy` is a OneShotMerge (its settings and its Flower part)."""
    s = strategy
    r = MergeRound(methods=dict(s.methods), etas=s.etas, task_names=s.task_names,
                   theta0={k: v.detach().clone() for k, v in theta0.items()} if s.spill_dir is None
                   else dict(theta0))  # spilling: no second copy of theta0 (it is not modified)
    s.outcome = r  # the round in progress: what a failure record reports if the run must stop
    s.spill = SpillDir(s.spill_dir) if s.spill_dir is not None else None
    try:
        return _steps(s, grid, r, train_config, evaluate_config, timeout)
    except MergeRoundError as e:
        e.partial = r  # what the round had when it stopped: the ServerApp's failure.json
        raise
    finally:  # spill files never outlive the round (clients' per-task parts are in memory)
        if s.spill is not None:
            s.spill.cleanup()
            s.spill = None


def _steps(s: Any, grid: Grid, r: MergeRound, train_config: Mapping[str, Any],
           evaluate_config: Mapping[str, Any], timeout: float) -> MergeRound:
    # 1. Train: theta0 to every client; replies become ClientUpdates (failures named).
    phase(s, "train")
    config = {**train_config, **train_requests(s.methods, s.measure_heterogeneity)}
    updates, r.failures = s.train(grid, r.theta0, config, timeout)
    t0 = time.perf_counter()
    phase(s, "aggregate")
    # 2. Task vectors over the merge-key patterns; malformed or non-finite ones left out.
    r.clients, task_vectors, left_out = collect_updates(updates, r.theta0, s.is_merged, s.spill)
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
    # (a method whose knobs are searched keeps the settings K allows: its defaults need not fit)
    fixed = {m: v for m, v in s.methods.items() if s.search != "paper" or not s.spaces.get(m)}
    check_enough(len(r.clients), s.min_clients, fixed, r.failures)
    # node-config checkpoint clients are first seen here: steps where a method needs them
    check_checkpoint_steps([n for n, _ in s.methods.values()], r.clients)
    cached = sum(int(c.metrics.get("cached", 0)) for c in r.clients)
    if cached:
        log(INFO, "%d of %d clients reused a cached update (no training)", cached, len(r.clients))
    # 3. Colluding attackers replace their task vectors (client-side attacks already happened).
    task_vectors = collude(s.attack_plan, r.clients, task_vectors, asked)
    # 4. Candidates: each method's knob settings (search=paper; its fixed params otherwise),
    #    each with its own etas; one Delta per setting, all from the same updates.
    k = len(r.clients)
    r.candidates = plan_candidates(s.methods, s.spaces, s.search, s.lambdas, s.etas, task_vectors)
    check_enough(k, s.min_clients, candidate_methods(r.candidates), r.failures)  # e.g. Krum, K < 3
    deltas = merge_methods(candidate_methods(r.candidates), r.clients, task_vectors, s.weighting, s.device)
    r.timings["aggregate-seconds"] = time.perf_counter() - t0
    r.search = search_record(r.candidates, s.spaces, s.search, s.lambdas, k)
    if s.measure_heterogeneity:
        r.heterogeneity = measure(r.clients, task_vectors, s.weighting)
    log(INFO, "merged %d task vectors with %s in %.2fs: %d setting(s), %d candidate(s) to score",
        k, list(s.methods), r.timings["aggregate-seconds"], len(r.candidates), r.search["candidates"])
    # 5. Every candidate scored on validation (and on test too with test_all_etas); with a
    #    prescreen, on a validation subset first and each method's finalists on all of it.
    t1 = time.perf_counter()
    phase(s, "validation")
    by_task = {r.task_name(c): c for c in r.clients}
    ft_val = {t: finetuned_scores(c)["val"] for t, c in by_task.items()}
    grids = {label: c.etas for label, c in r.candidates.items()}
    splits = ["val", "test"] if s.test_all_etas else ["val"]
    if s.prescreen["fraction"]:
        scores = prescreen_phase(s, grid, r, deltas, grids, ft_val, evaluate_config, timeout)
    else:
        scores, lost = score_batched(s, grid, r.clients, r.theta0, deltas, grids, splits,
                                     "evaluation", evaluate_config, timeout, r.task_name)
        r.failures += lost
    r.timings["validation-evaluate-seconds"] = time.perf_counter() - t1
    # 6. Per method, the (setting, eta) chosen on (whole-split) validation only.
    choice, r.selection, r.notes = choose_settings(
        with_full_validation(scores), ft_val, {label: c.method for label, c in r.candidates.items()})
    # 6b. Learned coefficients (optional): a few coefficient-only rounds from Task
    #     Arithmetic's choice, scored on validation like any candidate.
    if s.coefficients["mode"] != "off":
        learn_phase(s, grid, r, task_vectors, scores, deltas, ft_val, choice, evaluate_config, timeout)
    # 6c. Greedy soup (optional): models added best first while validation does not drop.
    if s.greedy_soup:
        soup_phase(s, grid, r, task_vectors, scores, deltas, ft_val, choice, evaluate_config, timeout)
    for m, (label, eta, value) in choice.items():
        c = r.candidates[label]
        r.best_etas[m] = eta
        r.methods[m] = (c.name, c.params)  # the chosen setting's full parameters
        r.choices[m] = {"candidate": label, "knobs": c.knobs, "lambda": c.lam(eta, k), "eta": eta,
                        "validation": value}
    r.deltas = {m: deltas[label] for m, (label, _, _) in choice.items()}
    # 7. Test scored at the base and each method's choice only (unless already scored).
    if not s.test_all_etas:
        t2 = time.perf_counter()
        phase(s, "test")
        first = next(iter(r.candidates))
        scored = [c for c in r.clients if r.task_name(c) in scores[first]]
        test, lost = score_batched(s, grid, scored, r.theta0, r.deltas, chosen_plan(r.best_etas), ["test"],
                                   "test evaluation", evaluate_config, timeout, r.task_name)
        r.timings["test-evaluate-seconds"] = time.perf_counter() - t2
        r.failures += lost
        for m, (label, _, _) in choice.items():
            for task in scores[label]:
                empty = {"etas": [], "accuracy": [], "loss": []}
                scores[label][task]["test"] = test[m].get(task, {}).get("test", empty)
    # 8. Tidy rows (every setting's validation scores; test at the chosen one) and the summary.
    for label, c in r.candidates.items():
        chosen = c.method in choice and choice[c.method][0] == label
        r.rows += result_rows(c.method, c.name, c.params, r.best_etas[c.method] if chosen else None,
                              scores[label], by_task, s.attack_plan, knobs=c.knobs,
                              lam=lambda e, c=c: c.lam(e, k), finetuned=chosen)
    r.metrics = summary_metrics(r.rows, r.best_etas, {m: ch["lambda"] for m, ch in r.choices.items()})
    # 8b. The prediction ensemble and the best single run (optional): reference models,
    #     scored on val and test in one message; they change no method's choice.
    references = ensemble_phase(s, grid, r, task_vectors, ft_val, evaluate_config, timeout) if s.ensemble else {}
    r.metrics.update({f"{m}-test-accuracy": v for m, v in r.ensemble.get("test-accuracy", {}).items()})
    # 9. Within-run CIs: a paired bootstrap over test examples (grid clients' test-correct),
    #    on each method's chosen setting.
    chosen_scores = {m: scores[label] for m, (label, _, _) in choice.items()}
    r.predictions, missing = chosen_predictions(chosen_scores, r.best_etas)
    r.notes += missing
    r.notes += add_references(r.predictions, references)
    r.comparison = comparison_rows(r.predictions, reference_label(s.methods))
    r.failures, _ = attribute(r.failures, [c.partition_id for c in r.clients], asked, r.task_names)
    r.unscored_tasks = unscored_tasks(r.failures)
    if r.unscored_tasks:
        log(WARNING, "merged but not scored on test (client lost after training): %s",
            ", ".join(r.unscored_tasks))
    for note in r.notes:
        log(WARNING, "%s", note)
    return r
