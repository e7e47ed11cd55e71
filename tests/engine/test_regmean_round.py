"""RegMean through the real run path: one Flower simulation (K=2, the default demo model,
regmean and Task Arithmetic from the same updates) in which the server asks the clients for Gram matrices because the method needs them, the
clients send them with their updates, the server merges and the clients score the merge.

The reference Delta is computed here with numpy from what the clients sent: per linear
weight the ridge-regularised normal equations of RegMean written out, every other tensor the
mean of the task vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.io import results
from fl_merge.round.merging import train_requests

LINEAR = "backbone.7.weight"  # mnist-cnn's one nn.Linear(1568, 128) in the backbone


def test_only_regmean_asks_the_clients_for_grams():
    assert train_requests({"r": ("regmean", {})}, False) == {"compute-gram": True}
    assert train_requests({"r": ("regmean", {}), "f": ("fisher", {})}, False) == {
        "compute-gram": True, "compute-fisher": True}
    assert "compute-gram" not in train_requests({"t": ("task_arithmetic", {})}, True)


@pytest.fixture(scope="module")
def regmean_run(tmp_path_factory):
    from fl_merge.config.run_config import RunConfig
    from simulate import simulate_round

    out = tmp_path_factory.mktemp("regmean")
    cfg = RunConfig.from_flower({
        "num-clients": 2, "tasks": "rotate90,parity", "local-steps": "40,60", "method": "regmean,task_arithmetic",
        "search": "off", "etas": "0.5,1,1.5", "gram-samples": 500, "output-dir": str(out),
    }).resolve()
    return simulate_round(cfg, 2), out


def test_clients_sent_grams_and_the_server_solved_regmean(regmean_run):
    strategy, _ = regmean_run
    theta0, clients = strategy.theta0, strategy.clients
    for c in clients:
        assert list(c.extras["gram"]) == [LINEAR]
        assert tuple(c.extras["gram"][LINEAR].shape) == (1568, 1568)  # 9.8 MB of float32 each
    taus = [{k: (c.state[k] - theta0[k]).double().numpy() for k in theta0} for c in clients]
    alpha, ridge = strategy.method_params["alpha"], strategy.method_params["ridge"]
    assert (alpha, ridge) == (0.1, 1e-6)
    p = 0.5  # uniform weights, K = 2
    s = b = 0
    for c, tau in zip(clients, taus):
        g = c.extras["gram"][LINEAR].double().numpy()
        gt = alpha * g + (1 - alpha) * np.diag(np.diag(g))
        s, b = s + p * gt, b + p * tau[LINEAR] @ gt
    mean = {k: p * sum(t[k] for t in taus) for k in theta0}
    r = ridge * np.mean(np.diag(s))
    want = np.linalg.solve(s + r * np.eye(len(s)), (b + r * mean[LINEAR]).T).T
    np.testing.assert_allclose(strategy.delta[LINEAR].double().numpy(), want, rtol=1e-3, atol=1e-6)
    assert np.abs(want - mean[LINEAR]).max() > 1e-3 * np.abs(mean[LINEAR]).max()  # not the mean
    for k in theta0:
        if k != LINEAR:
            np.testing.assert_allclose(strategy.delta[k].double().numpy(), mean[k], rtol=1e-5, atol=1e-7)


def test_the_regmean_merge_was_scored_and_beats_chance(regmean_run):
    strategy, out = regmean_run
    rows = results.read_rows(out / results.RESULTS_FILE)
    chosen = [r for r in rows if r["model"] == "merged" and r["split"] == "test" and r["selected"]]
    assert {r["method"] for r in chosen} == {"regmean", "task_arithmetic"}  # from the same updates
    chosen = [r for r in chosen if r["method"] == "regmean"]
    assert {r["task"] for r in chosen} == {"rotate90", "parity"}
    assert all(r["eta"] == strategy.best_eta for r in chosen)
    assert all(r["accuracy"] > 0.5 for r in chosen)  # chance: 0.1 and 0.5
