"""The fl-merge ServerApp: load theta0, run one OneShotMerge round, write the results."""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_merge import results
from fl_merge.config import ConfigError, ResolvedConfig, RunConfig
from fl_merge.models import PretrainConfig, pretrained_backbone
from fl_merge.report import run_figure
from strategies.one_shot import OneShotMerge


def wait_for_clients(grid: Grid, k: int, timeout: float) -> None:
    """Block until k nodes are connected; a clear error after `timeout` seconds (Flower's
    own sampling would wait forever)."""
    deadline = time.monotonic() + timeout
    while (n := len(list(grid.get_node_ids()))) < k:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"only {n} of num-clients={k} clients connected after {timeout:.0f}s: "
                "start more SuperNodes (num-supernodes) or lower num-clients"
            )
        time.sleep(0.5)


def run_one_shot(grid: Grid, cfg: ResolvedConfig, run_id: Any = "") -> OneShotMerge:
    """The whole run: theta0 -> one merge round -> results files. Returns the strategy,
    which holds the client updates, Delta, chosen eta and result rows."""
    run = cfg.run
    t0 = time.perf_counter()
    theta0 = pretrained_backbone(run.model, PretrainConfig(steps=run.pretrain_steps,
                                                           seed=run.pretrain_seed), progress=False)
    k = run.num_clients
    strategy = OneShotMerge(
        methods=cfg.methods, etas=cfg.etas, test_all_etas=run.test_all_etas,
        min_clients=run.min_clients, attack_plan=cfg.attack_plan,
        weighting=run.weighting, device=run.device, task_names=cfg.tasks,
        fraction_train=1.0, fraction_evaluate=1.0,
        min_train_nodes=k, min_evaluate_nodes=k, min_available_nodes=k,
    )
    wait_for_clients(grid, k, run.connect_timeout)
    strategy.start(
        grid, ArrayRecord(theta0), num_rounds=1, timeout=run.round_timeout,
        train_config=ConfigRecord(cfg.train_config()),
        evaluate_config=ConfigRecord(cfg.task_config()),
    )
    out = cfg.output_dir()
    extra = {"run_id": run_id, "num_clients": k, "data": run.data,
             **{f"het_{name}": v for name, v in strategy.heterogeneity.items()
                if isinstance(v, (int, float))}}
    results.write_rows(out / results.RESULTS_FILE, strategy.rows, extra)
    heads = {strategy.task_name(c): c.per_task for c in strategy.clients}
    for i, (label, (name, params)) in enumerate(strategy.methods.items()):
        eta = strategy.best_etas[label]
        meta = {"method": name, "params": params, "eta": eta, "tasks": ",".join(cfg.tasks),
                "model": run.model}
        results.save_merged_model(out / results.model_file(label, primary=i == 0),
                                  strategy.merged_state(eta, label), heads, meta)
    results.write_json(out / results.RUN_FILE, {
        "run_id": run_id, "config": run.to_flower(), "tasks": cfg.tasks,
        "methods": {label: {"name": n, "params": p, "eta": strategy.best_etas[label]}
                    for label, (n, p) in strategy.methods.items()},
        "clients": [{"task": strategy.task_name(c), "node_id": c.node_id, **c.metrics}
                    for c in strategy.clients],
        "heterogeneity": strategy.heterogeneity,
        "failures": strategy.failures,  # clients left out: who, at which stage, why
        "timings": {**strategy.timings, "total-seconds": time.perf_counter() - t0},
    })
    run_figure(out)  # report.png: cosine heatmap, norms, per-task accuracy per method
    summary = results.format_summary(strategy.rows, "test accuracy")
    for line in summary.splitlines():
        log(INFO, "%s", line)
    for f in strategy.failures:
        log(INFO, "left out %s at %s: %s", f["client"], f["stage"], f["reason"])
    log(INFO, "fl-merge results: %s", out)
    return strategy


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is RunConfig defaults <- Flower run config <- `overrides`
    (tests use overrides; `flwr run` uses --run-config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_flower({**dict(context.run_config), **dict(overrides or {})}).resolve()
        run_one_shot(grid, cfg, run_id=context.run_id)

    return app


app = make_server_app()
