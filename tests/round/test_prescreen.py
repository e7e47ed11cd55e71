"""Two-stage validation scoring (fl_merge/round/prescreen.py): finalists ranked by hand,
the subset is the first ceil(f * n) validation examples, bad settings are refused before
training, and one simulated round scores every candidate on the subset, only the finalists
on the whole split, and chooses among those."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.round.prescreen import (
    PRESCREEN,
    check_prescreen,
    combine_stages,
    finalist_grids,
    first_fraction,
    with_full_validation,
)
from simulate import simulate_round


def _part(etas, accs):
    return {"val": {"etas": etas, "accuracy": accs, "loss": [0.0] * len(etas)}}


def test_finalists_are_each_methods_best_by_mean_normalized_accuracy():
    # two ties settings and one fedavg setting, two tasks with fine-tuned val 0.8 and 0.5
    ft = {"a": 0.8, "b": 0.5}
    scores = {
        "ties[d=0.2]": {"a": _part([0, 0.5, 1], [0.4, 0.6, 0.7]), "b": _part([0, 0.5, 1], [0.2, 0.4, 0.2])},
        "ties[d=0.5]": {"a": _part([0, 0.5, 1], [0.4, 0.72, 0.2]), "b": _part([0, 0.5, 1], [0.2, 0.3, 0.1])},
        "fedavg": {"a": _part([0, 0.5, 1], [0.4, 0.5, 0.6]), "b": _part([0, 0.5, 1], [0.2, 0.3, 0.3])},
    }
    method_of = {"ties[d=0.2]": "ties", "ties[d=0.5]": "ties", "fedavg": "fedavg"}
    # by hand, mean of acc/ft over a, b:
    # ties d=0.2: eta .5 -> (.75 + .8)/2 = .775, eta 1 -> (.875 + .4)/2 = .6375
    # ties d=0.5: eta .5 -> (.9 + .6)/2 = .75,   eta 1 -> (.25 + .2)/2 = .225
    # fedavg:     eta .5 -> (.625 + .6)/2 = .6125, eta 1 -> (.75 + .6)/2 = .675
    assert finalist_grids(scores, ft, method_of, 2) == {
        "ties[d=0.2]": [0.0, 0.5], "ties[d=0.5]": [0.0, 0.5], "fedavg": [0.0, 0.5, 1.0]}
    assert finalist_grids(scores, ft, method_of, 1) == {"ties[d=0.2]": [0.0, 0.5], "fedavg": [0.0, 1.0]}
    # without a fine-tuned accuracy, raw accuracy ranks: fedavg eta .5 -> .4, eta 1 -> .45
    raw = finalist_grids(scores, {"a": 0.8, "b": None}, method_of, 1)
    assert raw["fedavg"] == [0.0, 1.0]


def test_ties_go_to_the_earlier_setting_then_the_smaller_eta():
    scores = {"x1": {"a": _part([0, 1, 2], [0.1, 0.5, 0.5])}, "x2": {"a": _part([0, 1, 2], [0.1, 0.5, 0.5])}}
    assert finalist_grids(scores, {"a": 1.0}, {"x1": "x", "x2": "x"}, 1) == {"x1": [0.0, 1.0]}
    assert finalist_grids(scores, {"a": 1.0}, {"x1": "x", "x2": "x"}, 3) == {"x1": [0.0, 1.0, 2.0],
                                                                              "x2": [0.0, 1.0]}


def test_the_subset_is_the_first_ceil_fraction_of_the_examples():
    data = TensorDataset(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    assert first_fraction(data, 0.25).tensors[1].tolist() == [0, 1, 2]  # ceil(2.5)
    assert len(first_fraction(data, 0.01)) == 1
    assert len(first_fraction(data, 0.0)) == 10


def test_stages_combine_and_selection_reads_only_the_whole_split():
    first = {"m": {"a": _part([0, 1], [0.2, 0.3])}, "n": {"a": _part([0, 1], [0.2, 0.1])}}
    full = {"m": {"a": _part([0, 1], [0.25, 0.35])}}
    both = combine_stages(first, full)
    assert both["m"]["a"][PRESCREEN]["accuracy"] == [0.2, 0.3]
    assert both["m"]["a"]["val"]["accuracy"] == [0.25, 0.35]
    assert "val" not in both["n"]["a"]
    assert list(with_full_validation(both)) == ["m"]


@pytest.mark.parametrize("fraction, finalists, test_all, match", [
    (1.0, 3, False, "prescreen must be 0 .off. or a fraction"),
    (-0.1, 3, False, "prescreen must be 0"),
    (0.25, 0, False, "finalists must be at least 1"),
    (0.25, 3, True, "use one of them"),
])
def test_bad_settings_are_refused(fraction, finalists, test_all, match):
    with pytest.raises(ValueError, match=match):
        check_prescreen(fraction, finalists, test_all)
    cfg = RunConfig(prescreen=fraction, finalists=finalists, test_all_etas=test_all)
    with pytest.raises(ConfigError, match=match):
        cfg.resolve()


def test_a_round_scores_all_candidates_on_the_subset_and_chooses_among_finalists(tmp_path):
    from fl_merge.tasks.registry import load_task
    from fl_merge_clients.training import model_for_task
    from fl_merge.models.evaluation import evaluate

    fraction = 0.3
    cfg = RunConfig.from_flower({
        "num-clients": 2, "tasks": "rotate90,parity", "local-steps": "30", "method": "task_arithmetic,ties",
        "lambdas": "0.1,0.3,1", "method-params": "ties.density=0.2|0.5", "prescreen": fraction,
        "finalists": 2, "output-dir": str(tmp_path), "cache": False,
    }).resolve()
    r = simulate_round(cfg, 2)
    pre = [x for x in r.rows if x["split"] == PRESCREEN and x["model"] == "merged"]
    val = [x for x in r.rows if x["split"] == "val" and x["model"] == "merged"]
    # every candidate on the subset (2 tasks x (3 lambdas + 2 densities x 3 lambdas)), finalists only on all of val
    assert len(pre) == 2 * (3 + 2 * 3)
    assert r.search["prescreen"] == {"fraction": fraction, "finalists": 2, "finalist-candidates": 4}
    assert len(val) == 2 * 4
    for method in ("task_arithmetic", "ties"):
        # the finalists are the method's 2 best by the subset's mean normalized accuracy
        ranked: dict[tuple[str, float], list[float]] = {}
        for x in pre:
            if x["method"] == method:
                ranked.setdefault((x["knobs"], x["eta"]), []).append(x["normalized_accuracy"])
        order = sorted(ranked, key=lambda k: -sum(ranked[k]))
        finals = {(x["knobs"], x["eta"]) for x in val if x["method"] == method}
        if not math.isclose(sum(ranked[order[1]]), sum(ranked[order[2]])):  # no tie at the cut
            assert finals == set(order[:2])
        chosen = {(x["knobs"], x["eta"]) for x in r.rows if x["split"] == "test" and x["selected"]
                  and x["model"] == "merged" and x["method"] == method}
        assert len(chosen) == 1 and chosen <= finals
    # the subset is the first ceil(0.3 n) validation examples: the base scored here independently
    client = next(c for c in r.clients if r.task_name(c) == "rotate90")
    task = load_task("rotate90", 0)
    m = math.ceil(fraction * len(task.val))
    subset = TensorDataset(*(t[:m] for t in task.val.tensors))
    base = model_for_task("mnist-cnn", task, {**r.theta0, **client.per_task}, 0)
    base_pre = next(x["accuracy"] for x in r.rows if x["split"] == PRESCREEN and x["model"] == "base"
                    and x["task"] == "rotate90")
    assert base_pre == pytest.approx(evaluate(base, subset)[0])
