"""Optional steps of a round after the choice on validation: learned coefficients
(fl_merge/round/coefficients.py) and greedy soup (fl_merge/merging/soups.py). Each ends with one more
candidate (a model at eta 1) scored on validation like the others, whose test score the
round's step 7 takes at its choice; nothing here reads test data."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any, Protocol

from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_merge.merging.learned import learn_coefficients, make_blocks
from fl_merge.merging.personal import delta_nbytes
from fl_merge.io.spill import SpillDir
from fl_merge.round import coefficients as coef
from fl_merge.round.candidates import Candidate
from fl_merge.round.merging import merge_arguments
from fl_merge.round.outcome import MergeRound
from fl_merge.round.prescreen import FRACTION_KEY, combine_stages, finalist_grids
from fl_merge.round.scoring import delta_batches
from fl_merge.round.selection import Choice, choose_settings
from fl_merge.round.settings import RoundSettings
from fl_merge.merging.soups import greedy_soup, soup_delta
from fl_merge.core.task_vectors import StateDict
from fl_merge.round.updates import ClientUpdate


class RoundMessages(Protocol):
    """What the round asks of the Flower strategy (OneShotMerge): its settings (read once, by
    run_round) and messages out, replies checked. The steps read nothing else of it."""

    settings: RoundSettings
    arrayrecord_key: str
    configrecord_key: str

    def train(self, grid: Grid, theta0: StateDict, config: Mapping[str, Any], timeout: float,
              spill: SpillDir | None = None) -> tuple[list[ClientUpdate], list[dict[str, Any]]]: ...

    def score(self, grid: Grid, clients: Sequence[ClientUpdate], theta0: StateDict,
              deltas: Mapping[str, StateDict], grids: dict, splits: Sequence[str], phase: str,
              config: Mapping[str, Any], timeout: float, task_name: Any) -> tuple[dict, list]: ...

    def coefficient_round(self, grid: Grid, clients: Sequence[ClientUpdate], theta0: StateDict,
                          task_vectors: Sequence[StateDict], coefs: Any, blocks: Sequence[Sequence[str]],
                          config: Mapping[str, Any], held: set, timeout: float) -> tuple[list, dict[str, int]]: ...


@dataclass
class Exchange:
    """The Flower side of one round: the strategy that builds and sends its messages
    (OneShotMerge: train, score, coefficient_round), the grid, the evaluate config every
    scoring message carries, the reply timeout and the round's spill folder (or None)."""

    strategy: RoundMessages
    grid: Grid
    config: Mapping[str, Any]
    timeout: float
    spill: SpillDir | None = None

    @property
    def spilling(self) -> bool:
        return self.spill is not None


def score_batched(x: Exchange, clients: Sequence[Any], theta0: StateDict, deltas: Mapping[str, StateDict],
                  grids: dict, splits: Sequence[str], phase: str, task_name: Any,
                  config: Mapping[str, Any] | None = None) -> tuple[dict, list]:
    """`x.strategy.score` over the candidates in `grids`, one batch of Deltas per message round
    (fl_merge.round.scoring.delta_batches): the same scores table, bounded message size. A
    client failing in several batches is named once later (fl_merge.round.failures.attribute).
    `config`: the evaluate config, default x.config."""
    size = delta_nbytes(deltas[next(iter(grids))])  # one client's Delta (a personal method's too)
    scores: dict = {}
    failures: list = []
    for batch in delta_batches(list(grids), size):
        got, lost = x.strategy.score(x.grid, clients, theta0, {m: deltas[m] for m in batch},
                                     {m: grids[m] for m in batch}, splits, phase,
                                     x.config if config is None else config, x.timeout, task_name)
        scores.update(got)
        failures += lost
    return scores, failures


def add_candidate(x: Exchange, r: MergeRound, scores: dict, deltas: dict,
                  ft_val: Mapping[str, float | None], choice: Choice, cand: Candidate, delta: StateDict) -> None:
    """Score `cand` (theta0 + eta * delta at its etas) on validation and add it to the
    round's candidates, deltas and choices."""
    val, lost = score_batched(x, r.clients, r.theta0, {cand.label: delta}, {cand.label: cand.etas},
                              ["val"], f"{cand.label} evaluation", r.task_name)
    r.failures += lost
    scores[cand.label] = val[cand.label]
    r.candidates[cand.label] = cand
    deltas[cand.label] = delta
    r.methods[cand.label] = (cand.name, cand.params)
    choice.update(choose_settings({cand.label: val[cand.label]}, ft_val, {cand.label: cand.label})[0])


def validation_score(x: Exchange, r: MergeRound, deltas: Mapping[str, StateDict],
                     ft_val: Mapping[str, float | None]) -> dict[str, float]:
    """label -> the round's validation criterion (mean normalized accuracy) of theta0 +
    delta, every delta scored in one evaluation message per client."""
    val, lost = score_batched(x, r.clients, r.theta0, deltas, {m: [1.0] for m in deltas}, ["val"],
                              "soup evaluation", r.task_name)
    r.failures += lost
    chosen = choose_settings(val, ft_val, {m: m for m in deltas})[0]
    return {m: chosen[m][2] for m in deltas}


def soup_phase(x: Exchange, st: RoundSettings, r: MergeRound, task_vectors: list[StateDict], scores: dict,
               deltas: dict, ft_val: Mapping[str, float | None], choice: Choice) -> None:
    """Greedy soup (Wortsman et al. 2022, Algorithm 1): each client's model scored on every
    client's validation split, then added best first while the soup does not lose."""
    singles = {f"model-{i}": tv for i, tv in enumerate(task_vectors)}
    own = validation_score(x, r, singles, ft_val)
    members, history = greedy_soup(
        [own[f"model-{i}"] for i in range(len(task_vectors))],
        lambda m: validation_score(x, r, {"soup": soup_delta(task_vectors, m)}, ft_val)["soup"])
    names = [r.task_name(c) for c in r.clients]
    r.soup = {"own-validation": [own[f"model-{i}"] for i in range(len(names))],
              "members": [names[i] for i in members],
              "history": [{**h, "model": names[h["model"]]} for h in history]}
    cand = coef.phase_candidate("greedy-soup", "greedy_soup", {"members": r.soup["members"]})
    add_candidate(x, r, scores, deltas, ft_val, choice, cand, soup_delta(task_vectors, members))
    log(INFO, "greedy soup: %d of %d models (%s)", len(members), len(names), ", ".join(r.soup["members"]))


def learn_phase(x: Exchange, st: RoundSettings, r: MergeRound, task_vectors: list[StateDict], scores: dict,
                deltas: dict, ft_val: Mapping[str, float | None], choice: Choice) -> None:
    """The learned-coefficient phase (fl_merge/round/coefficients.py): start at Task
    Arithmetic's validated eta, learn on the clients' validation halves, then score the
    learned model on validation and add it to the round's candidates and choices."""
    opts = st.coefficients
    ta = next(m for m, (name, _) in st.methods.items() if name in coef.TA_NAMES)
    blocks = make_blocks(list(task_vectors[0]), opts.mode)
    weights = merge_arguments(r.clients, st.weighting)["weights"] or [1.0] * len(r.clients)
    start = coef.start_coefficients(choice[ta][1], weights, len(blocks))
    held: set = set()
    traffic: list[dict[str, int]] = []
    pos = {id(c): i for i, c in enumerate(r.clients)}
    cfg = {**x.config, coef.OBJECTIVE: opts.objective}

    def ask(coefs):
        answers, sent = x.strategy.coefficient_round(x.grid, r.clients, r.theta0, task_vectors, coefs, blocks,
                                                     cfg, held, x.timeout)
        traffic.append(sent)
        return [(g, coef.normalised_score(acc, ft_val.get(r.task_name(c))), weights[pos[id(c)]])
                for c, g, acc in answers]

    t0 = time.perf_counter()
    try:
        best, history = learn_coefficients(ask, start, rounds=opts.rounds, lr=opts.lr)
    except ValueError as e:  # e.g. no client answers QUERY messages (a plain Flower client)
        r.notes.append(f"learned coefficients skipped: {e}")
        return
    r.timings["coefficient-seconds"] = time.perf_counter() - t0
    cand = coef.learned_candidate(opts.mode, opts.objective)
    add_candidate(x, r, scores, deltas, ft_val, choice, cand, coef.learned_delta(task_vectors, best, blocks))
    r.coefficients = {"mode": opts.mode, "objective": opts.objective, "start-from": ta,
                      "blocks": len(blocks), "coefficients": best.tolist(), "history": history,
                      "bytes-first-round": traffic[0], "bytes-per-round": traffic[1:]}
    log(INFO, "learned %s coefficients (%d x %d) in %d round(s): validation %.4f -> %.4f; "
        "%d bytes of coefficients per later round (first: %d with the task vectors)",
        opts.mode, len(r.clients), len(blocks), len(history) - 1, history[0]["score"],
        max(h["score"] for h in history), traffic[1]["coefficients"] if len(traffic) > 1 else 0,
        traffic[0]["vectors"])


def prescreen_phase(x: Exchange, st: RoundSettings, r: MergeRound, deltas: Mapping[str, StateDict], grids: dict,
                    ft_val: Mapping[str, float | None]) -> dict:
    """Two-stage validation scoring (fl_merge/round/prescreen.py): every candidate on the
    first `prescreen` fraction of each client's validation split, then each method's
    `finalists` best on the whole split. Returns the combined scores table."""
    fraction, finalists = st.prescreen.fraction, st.prescreen.finalists
    first, lost = score_batched(x, r.clients, r.theta0, deltas, grids, ["val"], "prescreen evaluation",
                                r.task_name, {**x.config, FRACTION_KEY: fraction})
    r.failures += lost
    kept = finalist_grids(first, ft_val, {label: c.method for label, c in r.candidates.items()}, finalists)
    scored = [c for c in r.clients if r.task_name(c) in first[next(iter(first))]]
    full, lost = score_batched(x, scored, r.theta0, deltas, kept, ["val"], "finalist evaluation", r.task_name)
    r.failures += lost
    r.search["prescreen"] = {"fraction": fraction, "finalists": finalists,
                             "finalist-candidates": sum(len(e) - 1 for e in kept.values())}
    return combine_stages(first, full)
