"""The one run path: `run(RunConfig)` executes one fl-merge run and returns its results.

Every way of running fl-merge goes through `run`: Hydra `fl-merge` (one call per job),
`fl-merge-run`, experiments/_runner.py and benchmarks (through `fl-merge`). It

1. validates the config (`RunConfig.resolve()`, ConfigError before anything starts; an
   entry point that has resolved it already passes the `ResolvedConfig`, which is not
   resolved again) and fixes the output dir (``output-dir``, else ``./outputs/<time>-<methods>``);
2. pretrains (or loads from the cache) the base model here, so the run finds it cached, and
   checks the config against it (`fl_merge.config.base_fit`: merge-keys, client checkpoints;
   ConfigError before any process starts);
3. executes the Flower run with one of two engines:
   * ``simulation`` (default): Flower's in-process engine (`flwr.simulation.run_simulation`)
     in a child process of its own session (repeated runs in one process leak Ray state);
   * ``superlink``: `flwr run` of the app against a private local SuperLink
     (`fl_merge.engine.superlink`), i.e. exactly what a Flower user runs;
4. writes the run's console output to ``<output dir>/run.log`` and reads back
   ``results.csv`` and ``run.json``.

The output layout is the same for both engines (README "Output layout"): results.csv,
run.json, merged*.safetensors, report.png and run.log in the output dir; a run that did not
finish leaves failure.json beside run.log and none of the results files (the ServerApp's
record with the clients, else `_record_failure`'s with the reason).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fl_merge.io import results
from fl_merge.io.output_paths import unwritable_reason
from fl_merge.config.parsing import check_client_gpus
from fl_merge.config.run_config import ConfigError, ResolvedConfig, RunConfig
from fl_merge.deploy.processes import ERROR_TAG, RunFailed, child_env, stream_child

__all__ = ["ENGINES", "LOG_FILE", "Outcome", "RunFailed", "prepare", "run"]

LOG_FILE = results.LOG_FILE
ENGINES = ("simulation", "superlink")


@dataclasses.dataclass
class Outcome:
    out_dir: Path
    rows: list[dict[str, Any]]
    meta: dict[str, Any]


def prepare(cfg: RunConfig | ResolvedConfig, num_supernodes: int | None = None, client_gpus: float = 0.0,
            keys: tuple[str, str] = ("num-supernodes", "client-gpus")) -> tuple[ResolvedConfig, int, float]:
    """Validate (a RunConfig is resolved here, a ResolvedConfig is taken as it is); returns
    the resolved config with its output dir fixed (absolute), the SuperNode count and the
    GPU share per client. Raises ConfigError (one line), also for an output dir that cannot
    be written (fl_merge.io.output_paths; nothing is created)."""
    resolved = cfg if isinstance(cfg, ResolvedConfig) else cfg.resolve()
    k = resolved.run.num_clients
    supernodes = num_supernodes or k
    if isinstance(supernodes, bool) or not isinstance(supernodes, int) or supernodes < k:
        raise ConfigError(f"{keys[0]}={supernodes} must be an integer of at least "
                          f"num-clients={k} (one SuperNode per client)")
    gpus = check_client_gpus(client_gpus, keys[1])
    out = resolved.output_dir()
    if (why := unwritable_reason(out)) is not None:  # before any process starts
        raise ConfigError(f"output-dir {out} cannot be written: {why}")
    return resolved.with_output_dir(out), supernodes, gpus


def run(cfg: RunConfig | ResolvedConfig, *, num_supernodes: int | None = None, client_gpus: float = 0.0,
        engine: str = "simulation", stream: bool = True, progress: bool = True,
        app: Path | None = None, keep_superlink: bool = False) -> Outcome:
    """Run one fl-merge run (see the module docstring). Raises ConfigError for a bad config
    (before anything starts), RunFailed for a run that did not finish. `app` and
    `keep_superlink` are for the superlink engine (`fl_merge.engine.superlink.flwr_run`)."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    resolved, supernodes, gpus = prepare(cfg, num_supernodes, client_gpus)
    run_cfg = resolved.run
    out = Path(run_cfg.output_dir)
    theta0 = None
    from fl_merge.config.task_names import uses_registry_model

    if uses_registry_model(run_cfg, resolved.own_clients):
        from fl_merge.models.registry import PretrainConfig, pretrained_backbone

        theta0 = pretrained_backbone(run_cfg.model, PretrainConfig(steps=run_cfg.pretrain_steps,
                                                                   seed=run_cfg.pretrain_seed), progress=progress)
    from fl_merge.config.base_fit import check_fits_base, launch_layout

    # theta0's names and shapes against merge-keys and client checkpoints, before any process
    # starts (the ServerApp checks again); a base-checkpoint is read by its headers only.
    layout = launch_layout(run_cfg.base_checkpoint, theta0)
    if layout is not None:
        check_fits_base(resolved, layout)
    del theta0, layout
    log_path = out / LOG_FILE
    from fl_merge.round.failures import FAILURE_FILE

    (out / FAILURE_FILE).unlink(missing_ok=True)  # from an earlier run into this directory
    try:
        _execute(resolved, engine, supernodes, gpus, log_path, stream, app, keep_superlink)
        try:
            rows = results.read_rows(out / results.RESULTS_FILE)
            meta = json.loads((out / results.RUN_FILE).read_text())
        except OSError as e:
            raise RunFailed(f"the run wrote no results ({e}); log: {log_path}") from None
    except RunFailed as e:
        _record_failure(out / FAILURE_FILE, str(e))
        raise
    return Outcome(out, rows, meta)


def _record_failure(path: Path, reason: str) -> None:
    """failure.json for a run that failed outside the round (the ServerApp writes its own,
    with the clients, when the round itself stops): every failed run leaves its reason."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        results.write_json(path, {"status": "failed", "reason": reason})


def _execute(resolved: ResolvedConfig, engine: str, supernodes: int, gpus: float, log_path: Path,
             stream: bool, app: Path | None, keep_superlink: bool) -> None:
    """The run itself, in a child process (simulation) or through `flwr run` (superlink):
    each is a process of its own that receives the flat run config and resolves it once
    (job_main here; the ServerApp's main under `flwr run`). `app`: a Flower app directory
    whose ClientApp runs (default: fl-merge's own)."""
    run_cfg = resolved.run
    if engine == "simulation":
        spec = {"run_config": run_cfg.to_flower(), "num_supernodes": supernodes,
                "parent": os.getpid(), "client_gpus": gpus}
        extra_path: list[str] = []
        if app is not None:  # the app's own ClientApp, with the app's whole run config
            from fl_merge.config.flower_app import flower_overrides, read_flower_app

            flower_app = read_flower_app(app)
            sent = flower_overrides(flower_app, run_cfg.to_flower(), resolved.app_config)
            spec.update(app=str(flower_app.path), client_app=flower_app.clientapp,
                        own_clients=resolved.own_clients, client_run_config=sent)  # as `flwr run` sends
            extra_path = [str(flower_app.path)]
        cmd = [sys.executable, "-m", "fl_merge.engine.run", "_job", json.dumps(spec)]
        code, error = stream_child(cmd, log_path, stream, child_env(extra_path))
        if code != 0:
            raise RunFailed(f"the run failed (exit {code}): {error} (log: {log_path})")
    else:
        from fl_merge.engine.superlink import flwr_run

        flwr_run(run_cfg, supernodes, gpus, log_path, stream, app, keep_superlink, resolved.app_config)


def _die_with_parent(parent: int | None) -> None:
    """If the process that started this child dies (even by SIGKILL), kill this child's
    whole process group: a watchdog thread polls the parent pid, which keeps working while
    the main thread blocks inside Ray."""
    import threading

    if parent is None:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="fl-merge-parent-watch", daemon=True).start()


def _error_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _client_app(spec: dict[str, Any]) -> Any:
    """fl-merge's ClientApp, or the app's own (`client_app` in `app`), which gets the app's
    run config in its Context as under `flwr run` (Flower's in-process engine passes none)."""
    if "client_app" not in spec:
        from fl_merge_clients.client_app import app

        return app
    from flwr.clientapp import ClientApp
    from flwr.supercore.object_ref import load_app

    inner = load_app(spec["client_app"], ConfigError, spec["app"])
    if not isinstance(inner, ClientApp):
        raise ConfigError(f"clientapp {spec['client_app']} is not a flwr ClientApp")
    return _WithRunConfig(inner, spec["client_run_config"])


class _WithRunConfig:
    """A ClientApp seen through Flower's in-process engine with the run config `flwr run`
    would have given it (keys it already has are kept)."""

    def __init__(self, inner: Any, run_config: dict[str, Any]):
        self.inner, self.run_config = inner, run_config

    def __call__(self, message: Any, context: Any) -> Any:
        from flwr.app import Context

        # Flower's Context refuses a changed run_config: the same node and state, a fuller config
        return self.inner(message, Context(run_id=context.run_id, node_id=context.node_id,
                                           node_config=context.node_config, state=context.state,
                                           run_config={**self.run_config, **dict(context.run_config)}))


def job_main(argv: Sequence[str]) -> int:
    """The child: one in-process Flower simulation of a validated run config."""
    spec = json.loads(argv[0])
    _die_with_parent(spec.get("parent"))
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fl_merge_strategies.server_app import run_one_shot

    # this process's one resolution
    cfg = RunConfig.from_flower(spec["run_config"]).resolve(own_clients=bool(spec.get("own_clients")))
    client_app = _client_app(spec)
    holder: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        try:
            run_one_shot(grid, cfg, run_id=context.run_id)
            holder["ok"] = True
        except BaseException as e:
            holder["error"] = f"{type(e).__name__}: {_error_line(e)}"
            raise

    run_simulation(app, client_app, num_supernodes=int(spec["num_supernodes"]),
                   backend_config={"client_resources": {"num_cpus": 1,
                                                         "num_gpus": float(spec.get("client_gpus", 0.0))}})
    if not holder.get("ok"):
        print(ERROR_TAG + holder.get("error", "the ServerApp did not finish"), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["_job"]:
    sys.exit(job_main(sys.argv[2:]))
