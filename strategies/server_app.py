"""The fl-merge ServerApp: theta0 -> merge-key check -> one merge round -> results files.

theta0 comes from the model registry, or from run-config `base-checkpoint` (a safetensors
file or a directory holding model.safetensors). `merge-keys` and run-config
`client-checkpoints` are checked against theta0 before any client trains.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp

from fl_merge.io import results
from fl_merge.config.base_fit import check_fits_base
from fl_merge.config.flower_app import (
    LAUNCHER_LOG_VAR,
    FlowerApp,
    model_label,
    read_flower_app,
    server_output_dir,
    split_run_config,
)
from fl_merge.config.run_config import ConfigError, ResolvedConfig, RunConfig
from fl_merge.io.checkpoints import parse_size
from fl_merge.io.merged_writer import hf_folder_name, hf_model_folder, write_hf_model, write_merged_model
from fl_merge.io.mapped_base import mapped_hf_backbone
from fl_merge.io.predictions import PREDICTIONS_FILE, save_predictions
from fl_merge.merging.personal import own_delta
from fl_merge.stats.report import run_figure
from fl_merge.round.base import CheckpointError, load_checkpoint
from fl_merge.deploy.processes import watch_parent
from fl_merge.round.failures import FAILURE_FILE, failure_record, stopped_reason
from fl_merge.io.spill import release_freed_memory
from fl_merge.round.outcome import MergeRound, new_round
from fl_merge.round.tables import choice_origin, format_comparison
from fl_merge.round.updates import MergeRoundError
from .merge_round import phase, run_round
from .one_shot import OneShotMerge


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


def load_theta0(cfg: ResolvedConfig, mapped: bool = False) -> Mapping[str, Any]:
    """theta0 from base-checkpoint when set, else the registered model's base weights;
    ConfigError when merge-keys select none of its parameters (before any training).
    `mapped` (a large-model round): a safetensors base or an hf: folder's weights stay in
    their files, memory-mapped a tensor at a time, never whole in memory
    (fl_merge/io/mapped_base.py; an hf: folder only where that gives transformers' values)."""
    run = cfg.run
    if run.base_checkpoint:
        try:
            theta0 = load_checkpoint(run.base_checkpoint, mapped)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
    else:
        theta0 = None
        if mapped and run.model.startswith("hf:"):
            theta0, how = mapped_hf_backbone(run.model)
            log(INFO, "fl-merge: theta0 %s", how if theta0 is not None
                else f"loaded through transformers: {how}")
        if theta0 is None:
            from fl_merge.models.registry import PretrainConfig, pretrained_backbone

            theta0 = pretrained_backbone(run.model, PretrainConfig(steps=run.pretrain_steps,
                                                                   seed=run.pretrain_seed), progress=False)
    check_fits_base(cfg, theta0)  # also checked before the run started (fl_merge.engine.run)
    return theta0


def run_one_shot(grid: Grid, cfg: ResolvedConfig, run_id: Any = "") -> MergeRound:
    """The whole run: theta0 -> one merge round -> results files. Returns the MergeRound
    (client updates, Deltas, chosen etas, result rows, failures).

    A run that stops before its results leaves failure.json saying why (never beside
    half-written results): a round that cannot finish (MergeRoundError), Flower stopping
    this process (SystemExit/KeyboardInterrupt from its SIGINT), or the SuperLink dying: then
    this process is orphaned, Flower's own retries never end, and `watch_parent` writes the
    record and ends the process (docs/deployment.md)."""
    run = cfg.run
    t0 = time.perf_counter()
    # RLock: Flower's SIGINT may interrupt this thread inside `with writing`; "done" is set
    # once a record or the results are whole, "busy" while results are being written.
    writing = threading.RLock()
    held: dict[str, Any] = {"done": False, "busy": False, "round": None, "ppid": os.getppid()}
    out = cfg.output_dir()  # once: a default (timestamped) folder must not change mid-run
    settings = cfg.round_settings(out)  # the round's typed settings, built once

    def record_stop() -> None:
        with writing:
            if not held["done"] and not held["busy"]:
                r = held["round"]  # the round in progress
                why = stopped_reason(len(r.clients) if r else 0, os.getppid() != held["ppid"])
                write_failure(out, why, r, replies_lost=True)
                held["done"] = True

    stop_watch = watch_parent(record_stop)
    try:
        theta0 = load_theta0(cfg, mapped=settings.spilling)
        k = run.num_clients
        strategy = OneShotMerge(settings=settings, fraction_train=1.0, fraction_evaluate=1.0,
                                min_train_nodes=k, min_evaluate_nodes=k, min_available_nodes=k)
        held["round"] = r = new_round(settings, theta0)  # what a failure record reports
        del theta0  # a large model's lives in files (r.store or its own), memory-mapped: no copy here
        if settings.spilling:
            release_freed_memory()
        try:
            wait_for_clients(grid, k, run.connect_timeout)
            outcome = run_round(strategy, grid, r.theta0, cfg.train_config(), cfg.task_config(),
                                run.round_timeout, r)
        except (MergeRoundError, ConfigError) as e:  # ConfigError: too few clients connected
            with writing:
                write_failure(out, str(e), getattr(e, "partial", None))
                held["done"] = True
            raise
        outcome.timings["total-seconds"] = time.perf_counter() - t0
        with writing:
            held["busy"] = True
            phase(outcome, "write", settings.spilling)
            write_outputs(out, outcome, cfg, run_id)
            held["done"] = True
    except Exception:
        stop_watch.set()
        _close(held)
        raise
    except BaseException:  # Flower stops this process: record why; the watch stays armed,
        record_stop()  # in case Flower's shutdown hangs on the lost SuperLink
        _close(held)
        raise
    stop_watch.set()
    _close(held)  # the results are written: a large model's kept files go
    return outcome


def _close(held: dict[str, Any]) -> None:
    """Remove the files the round kept (a large model's theta0 and Deltas), if any."""
    if held.get("round") is not None:
        held["round"].close()


def write_failure(out: Path, reason: str, r: MergeRound | None, replies_lost: bool = False) -> None:
    """failure.json for a round that stopped: why, which clients had finished (partition,
    task, node) and where their updates are, who was lost, which tasks are missing
    (replies_lost: the SuperLink went away; see failure_record)."""
    finished = [{"partition_id": c.partition_id, "task": r.task_name(c), "node_id": c.node_id,
                 "cached": bool(c.metrics.get("cached", 0))} for c in (r.clients if r else [])]
    failures = r.failures if r else []
    stage = failures[-1]["stage"] if failures else "round"
    results.write_json(out / FAILURE_FILE, failure_record(reason, stage, finished, failures,
                                                          r.missing_tasks if r else [], replies_lost))
    log(INFO, "the run failed: %s (details: %s)", reason, out / FAILURE_FILE)


def write_outputs(out: Path, r: MergeRound, cfg: ResolvedConfig, run_id: Any) -> None:
    """results.csv, one merged model per method, run.json, report.png and (when clients sent
    per-example test correctness) predictions.safetensors under `out`."""
    extra = {"run_id": run_id, "num_clients": cfg.run.num_clients, "data": cfg.run.data,
             **{f"het_{name}": v for name, v in r.heterogeneity.items() if isinstance(v, (int, float))}}
    results.write_rows(out / results.RESULTS_FILE, r.rows, extra)
    (out / FAILURE_FILE).unlink(missing_ok=True)  # an earlier failed run in this directory
    heads = {r.task_name(c): c.per_task for c in r.clients}
    shard, hf_folder = parse_size(cfg.run.max_shard_size), hf_model_folder(cfg.run.model)
    for i, (label, (name, params)) in enumerate(r.methods.items()):
        eta = r.best_etas[label]
        # No run id or time here: identical runs give identical files (run.json has them).
        meta = {"method": name, "params": params, "eta": eta, "tasks": ",".join(heads),  # heads inside
                "model": model_label(cfg.run.model, cfg.run.base_checkpoint, cfg.own_clients)}
        if r.personal(label):  # EMR: each task's own model, one file each (README's layout)
            for c in r.clients:
                task = r.task_name(c)
                path = out / results.personal_model_file(label, task)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_merged_model(path, r.theta0, own_delta(r.deltas[label], c.identity), eta,
                                   {task: c.per_task}, {**meta, "tasks": task}, shard)
            continue
        file = results.model_file(label, primary=i == 0)  # tensor by tensor, never a merged state
        write_merged_model(out / file, r.theta0, r.deltas[label], eta, heads, meta, shard)
        if hf_folder is not None:  # an hf: model: also a folder transformers loads (README)
            write_hf_model(out / hf_folder_name(file), hf_folder, r.theta0, r.deltas[label], eta, meta, shard)
    if r.predictions:
        save_predictions(out / PREDICTIONS_FILE, r.predictions, r.best_etas)
    else:  # no stale file from an earlier run in the same directory
        (out / PREDICTIONS_FILE).unlink(missing_ok=True)
    results.write_json(out / results.RUN_FILE, {
        "run_id": run_id, "config": cfg.run.to_flower(), "tasks": cfg.tasks,
        # own_model: a personal method (EMR): each task scored on its own model (K models)
        "methods": {label: {"name": n, "params": p, "eta": r.best_etas[label], **r.choices.get(label, {}),
                            **({results.OWN_MODEL: True} if r.personal(label) else {})}
                    for label, (n, p) in r.methods.items()},
        "selection": r.selection,  # the criterion the setting and eta were chosen by (validation)
        # Each method's space (knob grids, settings, lambdas) and the number of candidates
        # scored on validation; timings hold the seconds they took.
        "search": r.search,
        "notes": r.notes,  # where the protocol degraded (e.g. missing fine-tuned accuracies)
        "clients": [{"task": r.task_name(c), "node_id": c.node_id, "grid-eval": c.grid_eval, **c.metrics}
                    for c in r.clients],
        "heterogeneity": r.heterogeneity,
        "failures": r.failures,  # clients left out: who (node, partition, task), at which stage, why
        "missing_tasks": r.missing_tasks,  # tasks with no usable update: not in results.csv
        "unscored_tasks": r.unscored_tasks,  # merged, but their client was lost before scoring test
        "timings": r.timings,
        "comparison": r.comparison,  # test accuracy and difference vs Task Arithmetic, 95% CIs
        "coefficients": r.coefficients,  # the learned-coefficient phase ({} when off)
        "soup": r.soup,  # the greedy soup ({} when off)
        "ensemble": r.ensemble,  # the prediction ensemble and best single model ({} when off)
        "chunking": r.chunking,  # chunked messages: counts and tensor bytes per kind ({} when off)
    })
    run_figure(out)  # report.png: cosine heatmap, norms, per-task accuracy per method
    for line in results.format_summary(r.rows, "test accuracy").splitlines():
        log(INFO, "%s", line)
    for line in choice_lines(r):
        log(INFO, "%s", line)
    for line in format_comparison(r.comparison).splitlines():
        log(INFO, "%s", line)
    for f in r.failures:
        log(INFO, "left out %s at %s: %s", f["client"], f["stage"], f["reason"])
    log(INFO, "fl-merge results: %s", out)


def choice_lines(r: MergeRound) -> list[str]:
    """One line per method: its chosen knobs, lambda (its paper's units) and eta, and how
    many candidates it was chosen from on validation."""
    out = []
    for label, ch in r.choices.items():
        knobs = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in ch["knobs"].items())
        out.append(f"{label}: lambda={ch['lambda']:.4g} (eta={ch['eta']:.4g}){' ' + knobs if knobs else ''}"
                   f", {choice_origin(label, r.search, r.coefficients, r.soup)}")
    return out


def installed_app(grid: Grid) -> FlowerApp | None:
    """The Flower app this ServerApp was installed from (its pyproject.toml in Flower's app
    folder), or None where there is none (Flower's in-process engine)."""
    from flwr.common.config import get_project_dir

    try:
        run = grid.run
        path = get_project_dir(run.fab_id, run.fab_version, run.fab_hash)
        return read_flower_app(path) if (path / "pyproject.toml").is_file() else None
    except (ValueError, AttributeError, OSError):  # no FAB (run_simulation), or unreadable
        return None


@contextmanager
def run_log(out: Path, enabled: bool) -> Iterator[None]:
    """Copy this process's Flower log lines to <out>/run.log while the run lasts (a bare
    `flwr run`: fl-merge-run writes run.log from the streamed output itself)."""
    if not enabled:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / results.LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    FLOWER_LOGGER.addHandler(handler)
    try:
        yield
    except Exception as e:
        log(ERROR, "fl-merge: the run failed: %s", e)
        raise
    finally:
        FLOWER_LOGGER.removeHandler(handler)
        handler.close()


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is RunConfig defaults <- Flower run config <- `overrides`
    (tests use overrides; `flwr run` uses --run-config). Keys that are not fl-merge's are the
    app's own (for its ClientApp); an app whose ClientApp is not fl-merge's names its own
    tasks and model (docs/own_app.md). The output dir is made absolute and logged first."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        flower_app = installed_app(grid)
        ours, _ = split_run_config({**dict(context.run_config), **dict(overrides or {})})
        ours["output-dir"] = server_output_dir(str(ours.get("output-dir", "")), os.environ)
        cfg = RunConfig.from_flower(ours).resolve(own_clients=bool(flower_app and flower_app.own_clients))
        out = cfg.output_dir()  # absolute: a relative one is under this process's working directory
        log(INFO, "fl-merge: output %s", out)
        with run_log(out, enabled=LAUNCHER_LOG_VAR not in os.environ):
            run_one_shot(grid, cfg.with_output_dir(out), run_id=context.run_id)

    return app


app = make_server_app()
