"""The round's typed settings (fl_merge.round.settings), the choice record (selection.apply_choice),
and the run config resolved exactly once per entry point."""

from __future__ import annotations

import pytest
import torch

from fl_merge.config.run_config import ConfigError, ResolvedConfig, RunConfig
from fl_merge.merging.search import LAMBDAS
from fl_merge.round.attacks import AttackPlan
from fl_merge.round.candidates import Candidate
from fl_merge.round.outcome import MergeRound, new_round
from fl_merge.round.selection import apply_choice
from fl_merge.round.settings import CoefficientSettings, PrescreenSettings, RoundSettings
from fl_merge.round.updates import ClientUpdate

# every parameter of ties other than density, at its default (a method's full parameters)
TIES_DEFAULTS = {"convention": "fl-merge"}


def test_build_labels_methods_adds_the_base_eta_and_fills_typed_sub_settings():
    st = RoundSettings.build(methods=["fedavg", ("ties", {"density": 0.3})], etas=[2.0, 0.5, 2.0],
                             learn_coefficients="task", coef_rounds=3, prescreen=0.25, finalists=2)
    assert st.methods == {"fedavg": ("fedavg", {}), "ties": ("ties", {"density": 0.3, **TIES_DEFAULTS})}
    assert st.etas == [0.0, 0.5, 2.0]  # sorted, duplicates gone, 0 (the base) added
    assert st.lambdas is None  # search off: the shared etas
    assert st.coefficients == CoefficientSettings("task", "supervised", 3, 0.05)
    assert st.prescreen == PrescreenSettings(0.25, 2)
    assert st.is_merged("backbone.conv.weight") and not st.is_merged("head.weight")


def test_default_lambdas_follow_the_search_mode():
    assert RoundSettings.build(search="paper").lambdas == sorted(LAMBDAS)
    assert RoundSettings.build(search="off").lambdas is None
    assert RoundSettings.build(lambdas=[1.0, 0.3, 1.0]).lambdas == [0.3, 1.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"weighting": "by-size"}, "weighting must be 'uniform' or 'num-examples', got 'by-size'"),
    ({"lambdas": [0.0, 1.0]}, "lambdas must be positive and finite, got 0.0"),
    ({"lambdas": [-0.3]}, "lambdas must be positive and finite, got -0.3"),
    ({"lambdas": "all"}, "lambdas must be a list of numbers, None or 'default', got 'all'"),
    ({"methods": [("fedgma", {"rho": [0.1, 0.5]})]}, "fedgma.rho (a grid): that needs search=paper"),
    ({"methods": ["fedavg"], "method_params": {"x": 1}}, "give method_params inside `methods`"),
    ({"search": "grid"}, "search"),
    ({"prescreen": 1.5}, "prescreen"),
    ({"learn_coefficients": "layer"}, "learn-coefficients"),
])
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        RoundSettings.build(**kwargs)


def test_only_unsearched_methods_are_fixed():
    st = RoundSettings.build(methods=["task_arithmetic", ("ties", {"density": [0.2, 0.5]})], search="paper")
    assert set(st.spaces["ties"]) >= {"density"}
    assert "ties" not in st.fixed_methods  # its knobs are searched: K need not fit its defaults
    off = RoundSettings.build(methods=["task_arithmetic", "ties"], search="off")
    assert set(off.fixed_methods) == {"task_arithmetic", "ties"}


def test_the_resolved_config_builds_the_same_settings_as_the_keywords(tmp_path):
    cfg = RunConfig(num_clients=3, method="fedavg,ties", method_params="ties.density=0.4", etas="1,2",
                    weighting="num-examples", greedy_soup=True, prescreen=0.5, finalists=2, spill=True,
                    attack="sign_flip", attackers="2", measure_heterogeneity=False, min_clients=2).resolve()
    st = cfg.round_settings(tmp_path)
    assert st.methods == {"fedavg": ("fedavg", {}), "ties": ("ties", {"density": 0.4, **TIES_DEFAULTS})}
    assert st.etas == [0.0, 1.0, 2.0] and st.lambdas is None and st.search == "paper"
    assert st.weighting == "num-examples" and st.greedy_soup and not st.ensemble
    assert st.prescreen == PrescreenSettings(0.5, 2) and st.spill_dir == str(tmp_path)
    assert st.task_names == cfg.tasks and st.min_clients == 2 and not st.measure_heterogeneity
    assert st.attack_plan.attacks(2) and not st.attack_plan.attacks(0)
    assert st.merge_keys == ("backbone.*",) and st.device == "auto"
    assert RunConfig(num_clients=2).resolve().round_settings(tmp_path).spill_dir is None


def test_strategy_takes_the_settings_or_keywords_never_both():
    from fl_merge_strategies import OneShotMerge, TiesMerge

    st = RoundSettings.build(method="median")
    assert OneShotMerge(settings=st).settings is st
    assert OneShotMerge(method="median").settings == st
    assert TiesMerge(method_params={"density": 0.2}).settings.methods == {
        "ties": ("ties", {"density": 0.2, **TIES_DEFAULTS})}
    with pytest.raises(ValueError, match="either as `settings` or as keyword arguments \\(etas\\)"):
        OneShotMerge(settings=st, etas=[1.0])


def test_new_round_copies_methods_and_clones_theta0_unless_spilling(tmp_path):
    theta0 = {"w": torch.ones(2)}
    st = RoundSettings.build(method="fedavg", etas=[1.0], task_names=["a", "b"])
    r = new_round(st, theta0)
    assert r.methods == st.methods and r.methods is not st.methods
    assert r.etas == [0.0, 1.0] and r.task_names == ["a", "b"]
    assert torch.equal(r.theta0["w"], theta0["w"]) and r.theta0["w"] is not theta0["w"]
    spilling = new_round(RoundSettings.build(spill_dir=str(tmp_path)), theta0)
    # no second copy of a large model in memory: theta0 is in the round's files, mapped
    assert spilling.theta0.path.parent == spilling.store.path and spilling.store.path.parent == tmp_path
    assert torch.equal(spilling.theta0["w"], theta0["w"])
    spilling.close()
    assert list(tmp_path.iterdir()) == []


def test_apply_choice_records_eta_lambda_params_and_delta():
    clients = [ClientUpdate(i, {"num-examples": 1}, {}) for i in range(4)]
    r = MergeRound(methods={"task_arithmetic": ("task_arithmetic", {}), "ties": ("ties", {})}, etas=[0.0, 1.0],
                   clients=clients)
    r.candidates = {
        "task_arithmetic": Candidate("task_arithmetic", "task_arithmetic", "task_arithmetic", {}),
        "ties[density=0.2]": Candidate("ties[density=0.2]", "ties", "ties", {"density": 0.2},
                                       knobs={"density": 0.2}),
    }
    deltas = {"task_arithmetic": {"w": torch.zeros(1)}, "ties[density=0.2]": {"w": torch.ones(1)}}
    apply_choice(r, {"task_arithmetic": ("task_arithmetic", 2.0, 0.9), "ties": ("ties[density=0.2]", 0.5, 0.8)},
                 deltas)
    assert r.best_etas == {"task_arithmetic": 2.0, "ties": 0.5}
    assert r.methods["ties"] == ("ties", {"density": 0.2})  # the chosen setting's params
    # Task Arithmetic's eta is K * lambda (K = 4 clients): lambda = 2.0 / 4; TIES's eta is lambda.
    assert r.choices["task_arithmetic"]["lambda"] == pytest.approx(0.5)
    assert r.choices["ties"] == {"candidate": "ties[density=0.2]", "knobs": {"density": 0.2},
                                 "lambda": pytest.approx(0.5), "eta": 0.5, "validation": 0.8}
    assert r.deltas["ties"] is deltas["ties[density=0.2]"]


def _count_resolutions(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = RunConfig.resolve

    def counting(self, *args, **kwargs):  # resolve(own_clients=...)
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RunConfig, "resolve", counting)
    return calls


def test_prepare_takes_a_resolved_config_as_it_is(monkeypatch, tmp_path):
    from fl_merge.engine.run import prepare

    resolved = RunConfig(num_clients=2, output_dir=str(tmp_path / "o")).resolve()
    calls = _count_resolutions(monkeypatch)
    again, supernodes, gpus = prepare(resolved)
    assert calls == [] and isinstance(again, ResolvedConfig)
    assert again.run.output_dir == str(tmp_path / "o") and (supernodes, gpus) == (2, 0.0)
    assert again.methods == resolved.methods and again.tasks == resolved.tasks
    prepare(RunConfig(num_clients=2))
    assert calls == [1]
    with pytest.raises(ConfigError, match="num-supernodes=1 must be an integer of at least num-clients=2"):
        prepare(resolved, 1)


def test_the_launcher_resolves_once_and_hands_the_run_that_config(monkeypatch, tmp_path):
    from fl_merge.cli import launch

    calls = _count_resolutions(monkeypatch)
    handed = []

    def fake_run(cfg, **kwargs):
        handed.append(cfg)
        raise launch.RunFailed("stopped here")

    monkeypatch.setattr(launch, "run", fake_run)
    assert launch.main(["-c", f"num-clients=2 output-dir='{tmp_path}'"]) == 1
    assert calls == [1] and isinstance(handed[0], ResolvedConfig)
    assert handed[0].run.output_dir == str(tmp_path)


def test_a_hydra_job_is_resolved_once_in_build_job(monkeypatch):
    from fl_merge.cli.mapping import plan

    calls = _count_resolutions(monkeypatch)
    (job,) = plan(["num_clients=2"], False)
    assert calls == [1] and job.resolved.run == job.run and job.resolved.tasks == RunConfig(num_clients=2).resolve().tasks
    moved = job.resolved.with_output_dir("/tmp/elsewhere")
    assert moved.run.output_dir == "/tmp/elsewhere" and moved.methods == job.resolved.methods


def test_default_attack_plan_attacks_nobody():
    assert not RoundSettings.build().attack_plan.attacks(0) and RoundSettings.build().attack_plan == AttackPlan()


def test_settings_from_a_resolved_config_are_not_checked_twice(monkeypatch, tmp_path):
    import fl_merge.round.settings as settings

    cfg = RunConfig(num_clients=2, method="ties", prescreen=0.5).resolve()  # every check made here

    def again(*args, **kwargs):
        raise AssertionError("checked a second time")

    monkeypatch.setattr(settings, "_check", again)
    assert cfg.round_settings(tmp_path).prescreen == PrescreenSettings(0.5, 3)
    with pytest.raises(AssertionError, match="second time"):
        RoundSettings.build(method="ties")  # keyword arguments from a user: checked


def test_a_hydra_run_resolves_its_config_once_and_hands_it_to_the_run(monkeypatch, tmp_path):
    import fl_merge.engine.run as engine_run
    from fl_merge.cli import hydra_app

    monkeypatch.chdir(tmp_path)  # Hydra's job dir (outputs/...) goes here
    calls = _count_resolutions(monkeypatch)
    handed = []

    def fake_run(cfg, **kwargs):
        handed.append(cfg)
        raise engine_run.RunFailed("stopped here")

    monkeypatch.setattr(engine_run, "run", fake_run)
    assert hydra_app.main(["num_clients=2"]) == 1
    assert calls == [1] and isinstance(handed[0], ResolvedConfig)  # plan's resolution, reused
    assert handed[0].run.num_clients == 2 and handed[0].run.output_dir.startswith(str(tmp_path))
