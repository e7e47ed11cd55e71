"""The fair protocol (issue 14 item 1): each method's space in its own units, every candidate
scored on validation, test only at each method's choice, selection blind to test.

The round is driven through test_strategy's FakeGrid; expected values are written out here
(grid sizes, norms, the papers' lambda formulas), never taken from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from fl_merge.merging.search import LAMBDAS, expand, knob_grids
from fl_merge.methods.cclip import cclip_radii
from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.round.candidates import method_spaces, plan_candidates
from fl_merge.round.selection import choose_settings
from fl_merge_strategies import OneShotMerge
from test_strategy import FakeGrid, _rich, _run

pytestmark = pytest.mark.usefixtures("message_identity")


def _taus(norms):
    """Task vectors along one direction (3, 4) / 5 with the given L2 norms."""
    return [{"a": torch.tensor([0.6 * n, 0.8 * n]), "b": torch.zeros(3)} for n in norms]


def _settings(method, k, given=None):
    return expand(method, {}, knob_grids(method, given or {}), _taus([1.0 + i for i in range(k)]))


def test_each_method_expands_into_its_declared_settings():
    assert [s["rho"] for s in _settings("fedgma", 3)] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert [s["density"] for s in _settings("ties", 3)] == [0.1, 0.2, 0.3]
    assert [s["drop_rate"] for s in _settings("dare", 3)] == [0.5, 0.7, 0.9]
    assert [s["gamma"] for s in _settings("breadcrumbs", 3)] == [0.8, 0.85, 0.9]
    assert [s["beta"] for s in _settings("trimmed_mean", 10)] == [0.1, 0.2, 0.3, 0.4]
    # Krum needs K > 2f + 2: K=7 allows f = 0, 1, 2; K=4 only f = 0.
    assert [s["f"] for s in _settings("krum", 7)] == [0, 1, 2]
    assert [s["f"] for s in _settings("multikrum", 4)] == [0]
    for method in ("fedavg", "task_arithmetic", "median", "fednova", "geometric_median", "fisher"):
        assert len(_settings(method, 3)) == 1  # only the scale
    # A knob given one value is pinned; a list of values is the grid.
    assert knob_grids("fedgma", {"rho": 0.3}) == {}
    grids = knob_grids("fedgma", {"rho": [0.2, 0.7]})
    assert [s["rho"] for s in expand("fedgma", {}, grids, _taus([1, 2]))] == [0.2, 0.7]


def test_cclip_radii_span_the_task_vector_norms():
    # Norms by hand: ||(0.6n, 0.8n, 0, 0, 0)|| = n; 8 points from 2 up to (not including) 10.
    taus = _taus([2.0, 10.0, 5.0])
    assert cclip_radii(taus) == pytest.approx([2.0 + 8.0 * j / 8 for j in range(8)])
    assert cclip_radii(taus) == pytest.approx(list(np.linspace(2.0, 10.0, 8, endpoint=False)))
    assert cclip_radii(_taus([3.0, 3.0])) == pytest.approx([3.0])  # equal norms: one radius
    settings = expand("cclip", {}, knob_grids("cclip", {}), taus)
    assert [s["tau"] for s in settings] == pytest.approx([2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])


def test_candidates_carry_each_methods_lambdas_in_its_own_units():
    methods = {"task_arithmetic": ("task_arithmetic", {}), "ties": ("ties", {"density": 0.2}),
               "fedgma": ("fedgma", {"rho": 0.5})}
    spaces = method_spaces({"task_arithmetic": ("task_arithmetic", {}), "ties": ("ties", {"density": 0.2}),
                            "fedgma": ("fedgma", {})})
    cands = plan_candidates(methods, spaces, "paper", [0.1, 0.5], [0.0, 1.0], _taus([1, 2, 3, 4]))
    assert len(cands) == 1 + 1 + 9
    assert cands["task_arithmetic"].etas == pytest.approx([0.0, 0.4, 2.0])  # eta = K * lambda, K = 4
    assert cands["ties"].etas == pytest.approx([0.0, 0.1, 0.5])  # eta = lambda
    assert cands["fedgma[rho=0.3]"].knobs == {"rho": 0.3}
    assert len(LAMBDAS) == 40 and LAMBDAS[0] == 0.05 and LAMBDAS[-1] == 2.0
    # search=off: fixed params and the shared eta grid for every method
    off = plan_candidates(methods, spaces, "off", None, [1.0, 2.0], _taus([1, 2, 3, 4]))
    assert list(off) == list(methods) and all(c.etas == [0.0, 1.0, 2.0] for c in off.values())
    assert off["fedgma"].params == {"rho": 0.5}


PEAK = {"task_arithmetic": 0.3, "ties": 1.0}  # lambda at which each method's validation peaks


def _peaked(order, k):
    """Validation accuracy 0.9 - |lambda - peak|, lambda in each method's own units; test
    accuracy peaks elsewhere (lambda 0.1) so that reading test would change every choice."""
    def score(i, eta, split):
        name = order[i]
        lam = eta / k if name == "task_arithmetic" else eta
        if eta == 0:
            return 0.2
        return 0.9 - abs(lam - (0.1 if split == "test" else PEAK[name]))
    return score


def test_ties_and_task_arithmetic_each_find_their_own_lambda():
    lambdas = [0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5]
    s = OneShotMerge(methods=["task_arithmetic", ("ties", {"density": 0.5})], search="paper",
                     lambdas=lambdas, measure_heterogeneity=False)
    grid = FakeGrid({100 + i: _rich(i, 10) for i in range(3)}, score=_peaked(["task_arithmetic", "ties"], 3))
    r = _run(s, grid)
    assert r.choices["task_arithmetic"]["lambda"] == pytest.approx(0.3)
    assert r.best_etas["task_arithmetic"] == pytest.approx(0.9)  # 3 clients: eta = 3 * 0.3
    assert r.choices["ties"]["lambda"] == pytest.approx(1.0) and r.best_etas["ties"] == pytest.approx(1.0)
    val = [m for m in grid.asked if m.metadata.message_type == MessageType.EVALUATE][:3]
    etas = [float(e) for e in val[0].content["config"]["etas"]]
    assert etas == pytest.approx([0.0, *(3 * x for x in lambdas), 0.0, *lambdas])
    chosen = [row for row in r.rows if row["selected"] and row["split"] == "test"]
    assert {row["method"]: row["lambda"] for row in chosen} == pytest.approx(
        {"task_arithmetic": 0.3, "ties": 1.0})
    assert r.metrics["ties-lambda"] == pytest.approx(1.0)


def test_test_is_scored_only_at_each_methods_chosen_setting():
    """fedgma searches 9 rhos x 2 lambdas on validation; test asks for the base and ONE
    candidate per method; the chosen rho is validation's best."""
    best_rho = 0.7

    def score(i, eta, split):  # delta i is fedgma's i-th rho (0.1 + 0.1 i), then fedavg
        if eta == 0:
            return 0.3
        rho = round(0.1 * (i + 1), 1) if i < 9 else None
        val = 0.8 - (abs(rho - best_rho) if rho is not None else 0.5) - 0.01 * eta
        return val if split == "val" else 1.0 - val  # test would pick the worst setting
    s = OneShotMerge(methods=["fedgma", "fedavg"], search="paper", lambdas=[0.2, 0.4],
                     measure_heterogeneity=False)
    grid = FakeGrid({100 + i: _rich(i, 10) for i in range(4)}, score=score)
    r = _run(s, grid)
    ev = [m for m in grid.asked if m.metadata.message_type == MessageType.EVALUATE]
    val, test = ev[:4], ev[4:]
    assert len(test) == 4 and len(val) == 4
    assert list(val[0].content["config"]["etas-per-delta"]) == [3] * 10  # base + 2 lambdas each
    assert list(test[0].content["config"]["splits"]) == ["test"]
    assert list(test[0].content["config"]["etas-per-delta"]) == [2, 2]  # base + the choice, per method
    assert list(test[0].content["config"]["delta-methods"]) == ["fedgma", "fedavg"]
    assert r.choices["fedgma"]["knobs"] == {"rho": best_rho}
    assert r.methods["fedgma"] == ("fedgma", {"rho": best_rho})
    assert r.choices["fedgma"]["lambda"] == pytest.approx(0.2)  # smaller eta: 0.01 * eta penalty
    test_rows = [row for row in r.rows if row["split"] == "test" and row["model"] == "merged"]
    assert {row["knobs"] for row in test_rows if row["method"] == "fedgma"} == {'{"rho": 0.7}'}
    assert len([row for row in r.rows if row["split"] == "val" and row["model"] == "merged"
                and row["method"] == "fedgma"]) == 4 * 9 * 2
    assert r.search["candidates"] == 9 * 2 + 2


def test_selection_never_reads_test_scores():
    """test_all_etas scores test at every candidate too; the choice is still validation's."""
    s = OneShotMerge(methods=["task_arithmetic", ("ties", {"density": 0.5})], search="paper",
                     lambdas=[0.1, 0.3, 1.0], test_all_etas=True, measure_heterogeneity=False)
    r = _run(s, FakeGrid({100 + i: _rich(i, 10) for i in range(3)},
                         score=_peaked(["task_arithmetic", "ties"], 3)))
    assert r.choices["task_arithmetic"]["lambda"] == pytest.approx(0.3)
    assert r.choices["ties"]["lambda"] == pytest.approx(1.0)
    # choose_settings on a table whose test split alone favours candidate b
    scores = {c: {"t": {"val": {"etas": [0.0, 1.0], "accuracy": [0.1, v]},
                        "test": {"etas": [0.0, 1.0], "accuracy": [0.1, w]}}}
              for c, v, w in (("a", 0.8, 0.1), ("b", 0.7, 0.99))}
    choice, _, _ = choose_settings(scores, {"t": 1.0}, {"a": "m", "b": "m"})
    assert choice["m"][0] == "a" and choice["m"][2] == pytest.approx(0.8)


def test_search_off_is_todays_protocol():
    """Fixed params (fedgma's default rho 0.5) and one shared eta grid for every method."""
    s = OneShotMerge(methods=["fedgma", ("ties", {"density": 0.5})], etas=[1.0, 2.0],
                     measure_heterogeneity=False)
    assert s.settings.search == "off" and s.settings.lambdas is None
    grid = FakeGrid({100 + i: _rich(i, 10) for i in range(3)})
    r = _run(s, grid)
    cfg = grid.asked[3].content["config"]
    assert list(cfg["etas"]) == [0.0, 1.0, 2.0] * 2 and list(cfg["delta-methods"]) == ["fedgma", "ties"]
    assert r.methods["fedgma"] == ("fedgma", {"rho": 0.5})
    assert r.best_etas == {"fedgma": 1.0, "ties": 2.0}  # test_strategy's _VAL table
    with pytest.raises(ValueError, match=r"several values given for fedgma.rho .*needs search=paper"):
        OneShotMerge(methods=[("fedgma", {"rho": [0.1, 0.5]})])


@pytest.mark.parametrize("search", ["paper", "off"])
@pytest.mark.parametrize("grid_eval", [True, False])
def test_fedavg_at_a_given_lambda_is_task_arithmetic(search, grid_eval):
    """lambdas=[0.3]: fedavg's merged model is theta0 + 0.3 * sum_i tau_i (Ilharco et al.),
    on both search modes and both client levels, and task_arithmetic's is the same."""
    seen = []

    def plain(state, cfg):
        seen.append((cfg["candidate-method"], cfg["candidate-eta"], state))
        return {"accuracy": 0.5, "loss": 0.0}

    replies = {100 + i: _rich(i, 10, grid_eval=grid_eval) for i in range(3)}
    theta0 = {"backbone.w": torch.full((3, 2), 0.25), "backbone.b": torch.full((2,), -0.5)}
    s = OneShotMerge(methods=["fedavg", "task_arithmetic"], search=search, lambdas=[0.3],
                     measure_heterogeneity=False)
    r = _run(s, FakeGrid(replies, plain=plain), theta0)
    for k in theta0:
        by_hand = theta0[k] + 0.3 * sum(replies[100 + i]["arrays"].to_torch_state_dict()[k] - theta0[k]
                                        for i in range(3))
        for m in ("fedavg", "task_arithmetic"):
            torch.testing.assert_close(r.merged_state(r.best_etas[m], m)[k], by_hand)
        for method, eta, state in seen:
            if eta > 0:
                torch.testing.assert_close(state[k], by_hand)
    assert r.choices["fedavg"]["lambda"] == pytest.approx(0.3) and r.best_etas["fedavg"] == pytest.approx(0.9)


def test_run_config_search_keys():
    cfg = RunConfig(num_clients=2, method="fedgma,ties", method_params="fedgma.rho=0.2|0.6").resolve()
    assert cfg.run.search == "paper" and cfg.lambdas == list(LAMBDAS)
    assert cfg.methods[0] == ("fedgma", {"rho": [0.2, 0.6]})
    assert RunConfig(num_clients=2, lambdas="1, 0.3").resolve().lambdas == [0.3, 1.0]
    assert RunConfig(num_clients=2, etas="1,2").resolve().lambdas is None  # a shared eta grid
    off = RunConfig(num_clients=2, search="off").resolve()
    assert off.lambdas is None and off.etas == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    for kwargs, message in (
            ({"search": "grid"}, "search must be one of paper, off, got 'grid'"),
            ({"lambdas": "0.3", "etas": "1"}, "give lambdas .* or etas .*, not both"),
            ({"lambdas": "0,1"}, "lambdas must be positive"),
            ({"lambdas": "x"}, "lambdas: 'x' is not a number"),
            ({"search": "off", "method": "fedgma", "method_params": "rho=0.1|0.2"},
             "several values for fedgma.rho: a grid needs search=paper"),
            ({"method": "fedgma", "method_params": "rho=0.1|2"}, "rho must lie in"),
    ):
        with pytest.raises(ConfigError, match=message):
            RunConfig(num_clients=2, **kwargs).resolve()


def test_a_grid_reply_without_test_scores_never_reaches_selection():
    """Sanity of the fake: validation messages ask for val only (selection has no test to read)."""
    s = OneShotMerge(methods=["fedgma"], search="paper", lambdas=[0.5], measure_heterogeneity=False)
    grid = FakeGrid({100 + i: _rich(i, 10) for i in range(2)}, score=lambda i, eta, split: 0.5)
    _run(s, grid)
    first = [m for m in grid.asked if m.metadata.message_type == MessageType.EVALUATE][0]
    assert list(first.content["config"]["splits"]) == ["val"]


def test_searched_knobs_need_not_fit_k_by_default_but_fixed_ones_must():
    """Krum's default f=1 needs K >= 5; with f searched, K=3 runs f=0 (the only f it allows)."""
    assert RunConfig(num_clients=3, method="krum").resolve().methods == [("krum", {})]
    with pytest.raises(ConfigError, match=r"Krum with f=1 needs more than 2f\+2 = 4 clients, got 3"):
        RunConfig(num_clients=3, method="krum", search="off").resolve()
    with pytest.raises(ConfigError, match=r"Krum with f=1 needs more than 2f\+2 = 4 clients, got 3"):
        RunConfig(num_clients=3, method="krum", method_params="f=1").resolve()  # pinned
    s = OneShotMerge(method="krum", search="paper", lambdas=[0.5], measure_heterogeneity=False)
    r = _run(s, FakeGrid({100 + i: _rich(i, 10) for i in range(3)}, score=lambda i, eta, split: 0.5))
    assert r.choices["krum"]["knobs"] == {"f": 0} and r.methods["krum"] == ("krum", {"f": 0})
