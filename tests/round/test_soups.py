"""Model soups: greedy soup's order and rule by hand, the soup's update against the average
of the models' weights."""

from __future__ import annotations

import pytest
import torch

from fl_merge.merging.soups import greedy_soup, ingredient_order, keep_ingredient, soup_delta


def test_soup_update_is_the_average_of_the_chosen_models_weights():
    theta0 = {"w": torch.tensor([1.0, -2.0])}
    thetas = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([4.0, 2.0])}, {"w": torch.tensor([0.0, 0.0])}]
    tvs = [{"w": t["w"] - theta0["w"]} for t in thetas]
    soup = {"w": theta0["w"] + soup_delta(tvs, [0, 1])["w"]}
    torch.testing.assert_close(soup["w"], torch.tensor([3.0, 1.0]))  # (theta_0 + theta_1) / 2
    with pytest.raises(ValueError, match="at least one model"):
        soup_delta(tvs, [])


def test_greedy_soup_adds_only_models_that_do_not_hurt_validation():
    # own scores: model 2 best, then 0, then 3, then 1
    own = [0.80, 0.60, 0.90, 0.70]
    # a made-up validation oracle: model 3 spoils any soup, others help a little
    def evaluate(members):
        return 0.5 if 3 in members else 0.90 + 0.01 * (len(members) - 1)

    assert ingredient_order(own) == [2, 0, 3, 1]
    members, history = greedy_soup(own, evaluate)
    assert members == [2, 0, 1]
    assert [h["kept"] for h in history] == [True, True, False, True]
    assert history[1]["score"] == pytest.approx(0.91) and history[3]["score"] == pytest.approx(0.92)


def test_ties_follow_the_paper_rule():
    assert keep_ingredient(0.8, 0.8) and not keep_ingredient(0.8, 0.79)
    assert ingredient_order([0.5, 0.5, 0.7]) == [2, 0, 1]


def test_the_soup_preset_is_one_task_sharded_uniform_soup_and_greedy_soup():
    from hydra import compose, initialize_config_dir

    from fl_merge import cli
    from fl_merge.config.run_config import RunConfig

    with initialize_config_dir(str(cli.CONFIG_DIR), version_base="1.3"):
        cfg = compose(cli.CONFIG_NAME, overrides=["+experiment=soup"])
    r = RunConfig.from_flower(cli.to_flower(cfg)[0]).resolve()
    assert r.run.data == "iid" and r.tasks == [f"rotate90/{i}" for i in range(4)]
    # uniform soup = task_arithmetic at eta 1 only: theta0 + mean tau = mean theta
    assert r.methods == [("task_arithmetic", {})] and r.etas == [0.0, 1.0] and r.lambdas is None
    assert r.run.greedy_soup


def test_the_diwa_preset_trains_every_client_on_the_same_data_with_diverse_settings():
    from hydra import compose, initialize_config_dir

    from fl_merge.tasks.partitions import partition_indices
    from fl_merge import cli
    from fl_merge.config.run_config import RunConfig

    with initialize_config_dir(str(cli.CONFIG_DIR), version_base="1.3"):
        cfg = compose(cli.CONFIG_NAME, overrides=["+experiment=diwa"])
    r = RunConfig.from_flower(cli.to_flower(cfg)[0]).resolve()
    assert r.run.data == "shared" and r.methods == [("task_arithmetic", {})] and r.etas == [0.0, 1.0]
    assert r.run.ensemble and r.run.greedy_soup  # the references: ensemble and best single run
    assert len(set(r.local_steps)) == 4 and len(set(r.lrs)) == 4 and len(set(r.seeds)) == 4
    assert all(100 <= s <= 300 for s in r.local_steps) and all(0.003 <= x <= 0.03 for x in r.lrs)
    labels = __import__("numpy").array([0, 1, 1, 0, 2])
    for pid in range(3):  # no split: every client every example
        assert partition_indices(labels, "shared", 3, pid).tolist() == [0, 1, 2, 3, 4]
