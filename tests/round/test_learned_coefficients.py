"""The optional phases through Flower (one in-process simulation, K=2, mnist-cnn, both phases
on): learned coefficients (coefficient-only messages after the first, the learned model
scored like any method, never worse on validation than the Task Arithmetic start) and the
greedy soup."""

from __future__ import annotations

import json

import pytest

from fl_merge.config.run_config import ConfigError, RunConfig
from simulate import simulate_round


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    out = tmp_path_factory.mktemp("coef")
    cfg = RunConfig.from_flower({
        "num-clients": 2, "tasks": "rotate90,parity", "local-steps": "30", "method": "task_arithmetic",
        "search": "off", "etas": "0.5,1", "output-dir": str(out), "learn-coefficients": "block",
        "coef-rounds": 3, "coef-lr": 0.1, "cache": False, "greedy-soup": True,
    }).resolve()
    return simulate_round(cfg, 2), out


def test_later_rounds_carry_coefficients_only(learned):
    r, _ = learned
    c = r.coefficients
    k, b = 2, c["blocks"]
    assert b > 1 and len(c["coefficients"]) == k and len(c["coefficients"][0]) == b
    first, later = c["bytes-first-round"], c["bytes-per-round"]
    assert later and all(x["vectors"] == 0 for x in later)  # the vectors went once
    # per later round and client: K x B float64 coefficients plus a small config; the first
    # round carried theta0 and K task vectors, orders of magnitude more
    per_client = [x["coefficients"] / k for x in later]
    assert all(8 * k * b <= n < 8 * k * b + 4096 for n in per_client), per_client
    assert first["vectors"] > 100 * max(per_client)


def test_learned_model_is_scored_and_never_worse_on_validation_than_its_start(learned):
    r, out = learned
    label = "learned-block"
    assert r.best_etas[label] == 1.0 and label in r.deltas
    hist = r.coefficients["history"]
    assert hist[0]["round"] == 0 and max(h["score"] for h in hist) >= hist[0]["score"]
    test_rows = [x for x in r.rows if x["method"] == label and x["split"] == "test" and x["selected"]]
    assert {x["task"] for x in test_rows} == {"rotate90", "parity"}
    assert all(x["accuracy"] > 0.5 for x in test_rows)  # above chance on both (parity: 2 classes)
    run = json.loads((out / "run.json").read_text())
    assert run["coefficients"]["mode"] == "block" and label in run["methods"]


def test_bad_settings_are_refused_before_training():
    base = {"num-clients": 2, "tasks": "rotate90,parity"}
    with pytest.raises(ConfigError, match="learn-coefficients must be one of off, task, block"):
        RunConfig.from_flower({**base, "learn-coefficients": "yes"}).resolve()
    with pytest.raises(ConfigError, match="add method task_arithmetic"):
        RunConfig.from_flower({**base, "learn-coefficients": "task", "method": "ties"}).resolve()
    with pytest.raises(ConfigError, match="coef-objective must be one of supervised, entropy"):
        RunConfig.from_flower({**base, "learn-coefficients": "task", "coef-objective": "mse"}).resolve()


def test_hydra_keys_reach_the_run_config():
    from hydra import compose, initialize_config_dir

    from fl_merge import cli

    with initialize_config_dir(str(cli.CONFIG_DIR), version_base="1.3"):
        cfg = compose(cli.CONFIG_NAME, overrides=["learn_coefficients=block", "coef_rounds=2",
                                                  "coef_objective=entropy"])
    mapped = cli.to_flower(cfg)[0]
    assert mapped["learn-coefficients"] == "block" and mapped["coef-rounds"] == 2
    assert mapped["coef-objective"] == "entropy" and "coef-lr" not in mapped  # unset: default
    resolved = RunConfig.from_flower(mapped).resolve()
    assert resolved.run.coef_lr == RunConfig().coef_lr


def test_greedy_soup_starts_from_the_best_model_and_is_scored(learned):
    r, out = learned
    soup = r.soup
    own = dict(zip(["rotate90", "parity"], soup["own-validation"]))
    assert soup["history"][0]["model"] == max(own, key=own.get) and soup["history"][0]["kept"]
    assert len(soup["history"]) == 2 and soup["members"][0] == soup["history"][0]["model"]
    second = soup["history"][1]
    assert second["kept"] == (second["score"] >= soup["history"][0]["score"])
    assert r.best_etas["greedy-soup"] == 1.0
    rows = [x for x in r.rows if x["method"] == "greedy-soup" and x["split"] == "test" and x["selected"]]
    assert {x["task"] for x in rows} == {"rotate90", "parity"} and all(x["accuracy"] > 0.5 for x in rows)
    assert json.loads((out / "run.json").read_text())["soup"]["members"] == soup["members"]



def test_the_run_log_says_how_each_phase_model_was_chosen():
    # the learned model and the greedy soup are not in the search record: the log line used
    # to say "chosen on validation from ? candidate(s)" for them
    from fl_merge.round.tables import choice_origin

    search = {"methods": {"task_arithmetic": {"candidates": 8}}}
    coefs = {"mode": "block", "history": [{"round": r} for r in range(4)]}
    soup = {"own-validation": [0.9, 0.8, 0.7], "members": ["a", "b"], "history": [{}, {}, {}]}
    assert choice_origin("task_arithmetic", search, coefs, soup) == "chosen on validation from 8 candidate(s)"
    assert choice_origin("learned-block", search, coefs, soup) == \
        "the best on validation (stop halves) of 4 coefficient round(s)"
    # 3 models scored alone, then 2 soups (the first model starts the soup)
    assert choice_origin("greedy-soup", search, coefs, soup) == \
        "built on validation: 2 of 3 models kept, 5 validation evaluations"
    assert "?" not in choice_origin("learned-task", search, {}, {})
