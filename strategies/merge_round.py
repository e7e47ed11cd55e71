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

from fl_merge.round.merging import collude, measure, merge_methods, train_requests
from fl_merge.round.outcome import MergeRound
from fl_merge.round.scoring import chosen_plan, validation_plan
from fl_merge.round.selection import choose_etas
from fl_merge.round.tables import chosen_predictions, comparison_rows, reference_label
from fl_merge.round.tables import finetuned_scores, result_rows, summary_metrics
from fl_merge.round.updates import check_enough, collect_updates
from fl_merge.task_vectors import StateDict


def run_round(strategy: Any, grid: Grid, theta0: StateDict, train_config: Mapping[str, Any],
              evaluate_config: Mapping[str, Any], timeout: float) -> MergeRound:
    """train -> collect -> attacks -> merge -> score candidates on val -> select eta ->
    score test at the choice -> rows. `strategy` is a OneShotMerge (its settings and its
    Flower part)."""
    s = strategy
    r = MergeRound(methods=s.methods, etas=s.etas, task_names=s.task_names,
                   theta0={k: v.detach().clone() for k, v in theta0.items()})
    # 1. Train: theta0 to every client; replies become ClientUpdates (failures named).
    config = {**train_config, **train_requests(s.methods, s.measure_heterogeneity)}
    updates, r.failures = s.train(grid, r.theta0, config, timeout)
    t0 = time.perf_counter()
    # 2. Task vectors over the merge-key patterns; malformed or non-finite ones left out.
    r.clients, task_vectors, left_out = collect_updates(updates, r.theta0, s.is_merged)
    r.failures += left_out
    for f in r.failures:
        log(WARNING, "left out %s (%s): %s", f["client"], f["stage"], f["reason"])
    check_enough(len(r.clients), s.min_clients, s.methods, r.failures)
    cached = sum(int(c.metrics.get("cached", 0)) for c in r.clients)
    if cached:
        log(INFO, "%d of %d clients reused a cached update (no training)", cached, len(r.clients))
    # 3. Colluding attackers replace their task vectors (client-side attacks already happened).
    asked = len(updates) + len(r.failures) - len(left_out)  # every node sent the train message
    task_vectors = collude(s.attack_plan, r.clients, task_vectors, asked)
    # 4. One Delta per method, all from the same updates; heterogeneity from the same vectors.
    r.deltas = merge_methods(s.methods, r.clients, task_vectors, s.weighting, s.device)
    r.timings["aggregate-seconds"] = time.perf_counter() - t0
    if s.measure_heterogeneity:
        r.heterogeneity = measure(r.clients, task_vectors, s.weighting)
    log(INFO, "merged %d task vectors with %s in %.2fs", len(r.clients), list(s.methods),
        r.timings["aggregate-seconds"])
    # 5. Candidates scored on validation (and on test too with test_all_etas).
    grids, splits = validation_plan(list(r.deltas), r.etas, s.test_all_etas)
    scores, lost = s.score(grid, r.clients, r.theta0, r.deltas, grids, splits, "evaluation",
                           evaluate_config, timeout, r.task_name)
    r.failures += lost
    # 6. eta chosen on validation only.
    by_task = {r.task_name(c): c for c in r.clients}
    ft_val = {t: finetuned_scores(c)["val"] for t, c in by_task.items()}
    r.best_etas, r.selection, r.notes = choose_etas(scores, ft_val)
    # 7. Test scored at the base and each method's choice (unless already scored).
    if not s.test_all_etas:
        t1 = time.perf_counter()
        scored = [c for c in r.clients if r.task_name(c) in scores[r.primary]]
        test, lost = s.score(grid, scored, r.theta0, r.deltas, chosen_plan(r.best_etas), ["test"],
                             "test evaluation", evaluate_config, timeout, r.task_name)
        r.timings["test-evaluate-seconds"] = time.perf_counter() - t1
        r.failures += lost
        for label in scores:
            for task in scores[label]:
                empty = {"etas": [], "accuracy": [], "loss": []}
                scores[label][task]["test"] = test[label].get(task, {}).get("test", empty)
    # 8. Tidy rows and the summary.
    for label, (name, params) in s.methods.items():
        r.rows += result_rows(label, name, params, r.best_etas[label], scores[label], by_task, s.attack_plan)
    r.metrics = summary_metrics(r.rows, r.best_etas)
    # 9. Within-run CIs: a paired bootstrap over test examples (grid clients' test-correct).
    r.predictions, missing = chosen_predictions(scores, r.best_etas)
    r.notes += missing
    r.comparison = comparison_rows(r.predictions, reference_label(s.methods))
    for note in r.notes:
        log(WARNING, "%s", note)
    return r
