"""`fl-merge` (also `python -m fl_merge`): Hydra runs and sweeps of one-shot merging.

    fl-merge method=ties method.density=0.3                     # one run
    fl-merge method.name=[fedavg,ties,median] eval.etas=[0.5,1,2]   # 3 methods, one training pass
    fl-merge -m method=fedavg,ties data=dirichlet data.alpha=0.1,1.0 seed=0,1   # 8 jobs
    fl-merge report multirun/2026-01-01/12-00-00              # best settings + plots

Config tree (``configs/``; groups mirror the code): ``model/``, ``data/`` (tasks, iid,
dirichlet, pathological), ``training/``, ``method/`` (one flat yaml per registered method:
``name`` plus its parameters), ``eval/`` (etas, weighting), ``runtime/`` (device, cache,
output dir, num_supernodes), and ``num_clients``/``seed`` at the top.

Mapping onto the Flower run config (`to_flower`), then ``RunConfig.from_flower(...)``:

* a leaf ``<group>.<key>`` (or top-level ``<key>``) sets the run-config key ``<key>`` with
  dashes (``data.partition_task`` -> ``partition-task``); ``model.name``, ``data.name`` and
  ``method.name`` set ``model``, ``data`` and ``method``;
* ``null`` means unset: RunConfig's dataclass default applies (the single source of
  defaults; the yaml files only carry selections and the values that define a group);
* lists are joined with commas (``eval.etas=[0.5,1]`` -> ``etas="0.5,1"``);
* ``method.<param>`` values that differ from the registry default go to
  ``method-params`` as ``<method>.<param>=<value>`` for every listed method taking the
  parameter (one equal to the default is not passed: it is the default);
* ``runtime.num_supernodes`` is for the CLI only (simulated SuperNodes, default num_clients);
* ``runtime.output_dir`` null: the Hydra job's output dir (``outputs/<date>/<time>`` for a
  run, ``multirun/<date>/<time>/<job>`` in a sweep).

Every job of a command is composed and validated (``RunConfig.resolve()``) before anything
trains; a bad config is one line on stderr and exit code 2. Each job then runs Flower's
in-process simulation engine (``run_simulation``) in a child process (repeated runs in
one process leak Ray state); a failed job stops the command with exit code 1. In a sweep
every job appends its tidy rows to ``<sweep dir>/results.csv`` (`fl_merge.store`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_merge import results, store
from fl_merge.config import ConfigError, RunConfig, check_client_gpus

ROOT = Path(__file__).resolve().parents[1]
# The copy inside the package in a wheel install; ./configs in a checkout or editable install.
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else ROOT / "configs"
CONFIG_NAME = "config"
# A group's `name` key sets this run-config field.
GROUP_FIELDS = {"model": "model", "data": "data", "method": "method", "attack": "attack"}
# Keys for the CLI itself, not the run config.
CLI_OPTIONS = {"runtime.num_supernodes": "num_supernodes", "runtime.client_gpus": "client_gpus"}
ERROR_TAG = "fl-merge job error: "
# Hydra flags after which we do not plan/validate jobs ourselves (Hydra handles them).
_HYDRA_PASSTHROUGH = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--version",
                      "--shell-completion", "-sc", "--experimental-rerun", "--resolve",
                      "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"}


# --------------------------------------------------------------------------- mapping

def run_config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RunConfig)}


def _scalar(path: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ",".join(str(_scalar(path, v)) for v in value)
    if isinstance(value, dict):
        raise ConfigError(f"'{path}' is a mapping; give a value")
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal values (1 == 1.0), but a bool only equals a bool."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _method_settings(node: Mapping[str, Any]) -> dict[str, Any]:
    """The method group -> {"method": ..., "method-params": ...} (see the module docstring)."""
    from fl_merge.aggregation import available_methods, get_method
    from fl_merge.task_vectors import MergeInputError

    raw = node.get("name")
    names = [str(n) for n in raw] if isinstance(raw, (list, tuple)) else \
        [n for n in str(raw or "").replace(" ", ",").split(",") if n]
    if not names:
        raise ConfigError("method.name is empty: name at least one merge method")
    try:
        registry = {n: get_method(n) for n in names}
    except MergeInputError as e:
        raise ConfigError(str(e)) from None
    params: list[str] = []
    for pname, value in node.items():
        if pname == "name":
            continue
        takers = [n for n in names if pname in registry[n].params]
        if not takers:
            defaults = [get_method(m).params[pname] for m in available_methods()
                        if pname in get_method(m).params]
            if any(_same(value, d) for d in defaults):
                continue  # a group file's default, for a method not listed: nothing to pass
            raise ConfigError(f"method.{pname}={value}: none of the methods {names} takes "
                              f"'{pname}'")
        for n in takers:
            default = registry[n].params[pname]
            if _same(value, default):
                continue
            if isinstance(value, (list, tuple, dict)) or " " in str(value) or "," in str(value):
                raise ConfigError(f"method.{pname}: '{value}' is not a single value")
            params.append(f"{n}.{pname}={value}")
    out: dict[str, Any] = {"method": ",".join(names)}
    if params:
        out["method-params"] = " ".join(params)
    return out


def to_flower(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A composed Hydra config -> (Flower run-config dict with dashed keys holding only the
    values set, CLI options). Raises ConfigError for a key that is no setting."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    fields = run_config_fields()
    flower: dict[str, Any] = {}
    options: dict[str, Any] = {}

    def put(path: str, name: str, value: Any) -> None:
        if name not in fields:
            raise ConfigError(f"'{path}' is not a fl-merge setting (RunConfig has no field '{name}')")
        if value is not None:
            flower[name.replace("_", "-")] = _scalar(path, value)

    for key, value in data.items():
        if key == "hydra":
            continue
        if key == "method" and isinstance(value, dict):
            flower.update(_method_settings(value))
        elif isinstance(value, dict):
            for sub, v in value.items():
                path = f"{key}.{sub}"
                if path in CLI_OPTIONS:
                    if v is not None:
                        options[CLI_OPTIONS[path]] = v
                elif sub == "name":
                    if key not in GROUP_FIELDS:
                        raise ConfigError(f"'{path}': group '{key}' has no name setting")
                    put(path, GROUP_FIELDS[key], v)
                else:
                    put(path, sub, v)
        else:
            put(key, key, value)
    return flower, options


@dataclasses.dataclass
class Job:
    overrides: list[str]
    flower: dict[str, Any]
    run: RunConfig
    num_supernodes: int
    client_gpus: float = 0.0

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "(defaults)"


def build_job(cfg: Any, overrides: Sequence[str] = ()) -> Job:
    """Map, build RunConfig (unset values: its defaults) and validate; raises ConfigError."""
    flower, options = to_flower(cfg)
    run = RunConfig.from_flower(flower)
    run.resolve()
    supernodes = options.get("num_supernodes") or run.num_clients
    if isinstance(supernodes, bool) or not isinstance(supernodes, int) or supernodes < run.num_clients:
        raise ConfigError(f"runtime.num_supernodes={supernodes} must be an integer of at least "
                          f"num_clients={run.num_clients}")
    gpus = check_client_gpus(options.get("client_gpus", 0.0), "runtime.client_gpus")
    return Job(list(overrides), flower, run, supernodes, gpus)


def _is_hydra_override(item: str) -> bool:
    key = item.lstrip("+~").split("=", 1)[0]
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _error_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _compose_error(e: BaseException) -> str:
    """Hydra's multi-line composition errors as one line: no search path, the options of a
    missing group choice comma-separated, the cause of a failed override (unknown key)."""
    text = str(e).split("Config search path:")[0].split("\nSee https://hydra.cc")[0]
    head, _, options = text.partition("Available options in")
    line = _error_line(Exception(head)).rstrip(".; ")
    if options:
        group, _, names = options.partition(":")
        line += f"; available options in {group.strip()}: {', '.join(names.split())}"
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        line += f" ({str(cause).strip().splitlines()[0]})"
    return line


def expand(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """The jobs of a command line, as Hydra's basic sweeper forms them (cartesian product in
    the order given). A sweep without -m is a ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:  # OverrideParseException
        raise ConfigError(_compose_error(e)) from None
    axes: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            if not multirun:
                raise ConfigError(f"'{o.input_line}' is a sweep: add -m (--multirun) to run one job per value")
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(c) for c in itertools.product(*axes)]


def plan(overrides: Sequence[str], multirun: bool) -> list[Job]:
    """Compose and validate every job before anything runs; raises ConfigError naming the
    job (in a sweep) and what is wrong, in one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    mine = [o for o in overrides if not _is_hydra_override(o)]
    jobs: list[Job] = []
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3", job_name="fl-merge"):
        for job_overrides in expand(mine, multirun):
            where = f"job [{' '.join(job_overrides)}]: " if multirun else ""
            try:
                cfg = compose(CONFIG_NAME, overrides=job_overrides)
            except (HydraException, OmegaConfBaseException) as e:  # composition errors
                raise ConfigError(where + _compose_error(e)) from None
            try:
                job = build_job(cfg, job_overrides)
            except ConfigError as e:
                raise ConfigError(where + str(e)) from None
            if multirun and job.run.output_dir:
                raise ConfigError("runtime.output_dir cannot be set in a multirun: every job "
                                  "writes its own Hydra job dir (set hydra.sweep.dir instead)")
            jobs.append(job)
    return jobs


# --------------------------------------------------------------------------- one job

def _child_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }


def _stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop the child's process group (the child, its Ray processes): SIGINT, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    _sweep_group(proc)


def _sweep_group(proc: subprocess.Popen) -> None:
    """Kill whatever the finished child left in its process group (e.g. Ray workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def spawn(job: Job, log_path: Path, stream: bool) -> tuple[int, str]:
    """Run the job's simulation in a child process (own session); its output goes to
    `log_path` (and to stdout when `stream`). Returns (exit code, error line)."""
    spec = {"run_config": job.flower, "num_supernodes": job.num_supernodes, "parent": os.getpid(),
            "client_gpus": job.client_gpus}
    cmd = [sys.executable, "-m", "fl_merge.cli", "_job", json.dumps(spec)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_child_env(), start_new_session=True, cwd=os.getcwd())
    error, last = "", ""
    try:
        with open(log_path, "w") as log:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if stream:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if ERROR_TAG in line:
                    error = line.split(ERROR_TAG, 1)[1].strip()
                elif line.strip():
                    last = line.strip()
        code = proc.wait()
    except BaseException:  # Ctrl-C: stop the child and its Ray processes, then re-raise
        _stop_group(proc)
        raise
    _sweep_group(proc)
    return code, error or last


def _die_with_parent(parent: int | None) -> None:
    """If the fl-merge process that started this child dies (even by SIGKILL), kill this
    child's whole process group (it and its Ray processes): a watchdog thread polls the
    parent pid, which keeps working while the main thread blocks inside Ray."""
    import threading

    if parent is None:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="fl-merge-parent-watch", daemon=True).start()


def job_main(argv: Sequence[str]) -> int:
    """The child: one in-process Flower simulation of a validated job."""
    spec = json.loads(argv[0])
    _die_with_parent(spec.get("parent"))
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from strategies.server_app import run_one_shot

    cfg = RunConfig.from_flower(spec["run_config"]).resolve()
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


# --------------------------------------------------------------------------- Hydra

class _Sweep:
    """State shared by the Hydra task function across a command's jobs."""

    def __init__(self, jobs: list[Job] | None, multirun: bool):
        self.jobs = jobs
        self.multirun = multirun
        self.done = 0
        self.sweep_dir: Path | None = None
        self.started = time.monotonic()
        self.bar = None
        if multirun:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (logs, CI, tests).
            self.bar = tqdm(total=len(jobs) if jobs else None, unit="job", desc="fl-merge sweep",
                            disable=None, file=sys.stderr, dynamic_ncols=True)

    def say(self, text: str, err: bool = False) -> None:
        stream = sys.stderr if err else sys.stdout
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_SWEEP: _Sweep | None = None


def _fail(code: int, message: str) -> None:
    if _SWEEP is not None:
        _SWEEP.say(f"fl-merge: error: {message}", err=True)
    else:
        print(f"fl-merge: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _job_line(rows: list[dict[str, Any]], meta: Mapping[str, Any]) -> str:
    scores = []
    for method, eta in results.chosen_etas(rows).items():
        sel = [r["normalized_accuracy"] for r in rows if r["model"] == "merged" and r["split"] == "test"
               and r["method"] == method and r["selected"] is True]
        scores.append(f"{method} {sum(sel) / len(sel):.3f} (eta={eta:g})")
    clients = meta.get("clients") or []
    cached = sum(int(c.get("cached", 0)) for c in clients)
    return f"normalized test acc: {', '.join(scores)}; {cached}/{len(clients)} clients cached"


def _task(cfg: Any) -> None:
    """Hydra's task function: one job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fl_merge.models import PretrainConfig, pretrained_backbone

    state = _SWEEP or _Sweep(None, False)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job_dir = Path(hc.runtime.output_dir)
    overrides = [o for o in hc.overrides.task if not _is_hydra_override(o)]
    num = int(hc.job.num) if multirun else 0
    total = len(state.jobs) if state.jobs else "?"
    where = f"job {num + 1}/{total} [{' '.join(overrides) or '(defaults)'}]" if multirun else "run"
    try:
        job = build_job(cfg, overrides)
    except ConfigError as e:
        _fail(2, f"{where}: {e}")
    if not job.run.output_dir:
        job.flower["output-dir"] = str(job_dir)
        job.run = dataclasses.replace(job.run, output_dir=str(job_dir))
    out = job.run.resolve().output_dir()
    # Pretrain (or load) the base here, with a progress bar in a terminal; children find it cached.
    pretrained_backbone(job.run.model, PretrainConfig(steps=job.run.pretrain_steps,
                                                      seed=job.run.pretrain_seed),
                        progress=not multirun)
    t0 = time.monotonic()
    code, error = spawn(job, job_dir / "simulation.log", stream=not multirun)
    if code != 0:
        _fail(1, f"{where} failed (exit {code}): {error} (log: {job_dir / 'simulation.log'})")
    rows = results.read_rows(out / results.RESULTS_FILE)
    meta = json.loads((out / results.RUN_FILE).read_text())
    if multirun:
        sweep_dir = Path(hc.sweep.dir).resolve()
        state.sweep_dir = sweep_dir
        store.append_rows(sweep_dir / results.RESULTS_FILE, store.job_rows(
            rows, num, os.path.relpath(out, sweep_dir), overrides, store.config_hash(job.run.to_flower())))
        state.done += 1
        state.say(f"{where}: {_job_line(rows, meta)} [{time.monotonic() - t0:.0f}s]")
        if state.bar is not None:
            state.bar.update(1)
    else:
        print()
        print(results.format_summary(rows, "fl-merge: test accuracy per task (merged at the eta chosen on validation)"))
        print(f"\nresults: {out}")


def _hydra(argv: Sequence[str]) -> None:
    import hydra

    old = sys.argv
    sys.argv = ["fl-merge", *argv]
    try:
        hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base="1.3")(_task)()
    finally:
        sys.argv = old


def main(argv: Sequence[str] | None = None) -> int:
    global _SWEEP
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    if argv and argv[0] == "_job":
        return job_main(argv[1:])
    multirun = "-m" in argv or "--multirun" in argv
    jobs: list[Job] | None = None
    if not any(a.split("=", 1)[0] in _HYDRA_PASSTHROUGH for a in argv):
        try:
            jobs = plan([a for a in argv if not a.startswith("-")], multirun)
        except ConfigError as e:
            print(f"fl-merge: error: {e}", file=sys.stderr)
            return 2
    _SWEEP = _Sweep(jobs, multirun)

    def _interrupt(signum: int, _frame: Any) -> None:  # terminal closed, `kill`: as Ctrl-C
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _hydra(argv)
    except KeyboardInterrupt:
        _SWEEP.close()
        where = _SWEEP.sweep_dir / results.RESULTS_FILE if _SWEEP.sweep_dir else "the job dirs"
        print(f"\nfl-merge: interrupted after {_SWEEP.done} completed job(s); their rows are in {where}",
              file=sys.stderr)
        return 130
    except SystemExit as e:
        _SWEEP.close()
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        _SWEEP.close()
        sweep, _SWEEP = _SWEEP, None
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if sweep.multirun and sweep.sweep_dir is not None:
        print(f"fl-merge: {sweep.done} job(s) in {time.monotonic() - sweep.started:.0f}s; "
              f"results: {sweep.sweep_dir / results.RESULTS_FILE}\n"
              f"  best settings and plots: fl-merge report {sweep.sweep_dir}")
    return 0


# --------------------------------------------------------------------------- report

def _plot_eta(rows: list[dict[str, Any]], best: list[dict[str, Any]], path: Path, split: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fl_merge.report import _atomic_savefig

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, b in enumerate(best):
        color = f"C{i % 10}"
        curve = store.eta_curve(rows, b["method"], b["setting"], split)
        label = b["method"] if b["setting"] == "(all runs)" else f"{b['method']}: {b['setting']}"
        (solid,) = ax.plot([e for e, _ in curve], [a for _, a in curve], marker="o", color=color,
                           label=label[:70])
        other = "val" if split == "test" else "test"
        curve2 = store.eta_curve(rows, b["method"], b["setting"], other)
        (dashed,) = ax.plot([e for e, _ in curve2], [a for _, a in curve2], ls="--", marker=".",
                            color=color, alpha=0.6)
        # Test is usually scored only at the base and the chosen eta (eval.test_all_etas=false):
        # two points say nothing about the curve in between, so no line through them.
        for line, points in ((solid, curve), (dashed, curve2)):
            if len(points) <= 2:
                line.set_linestyle("none")
        for eta in b["etas"]:
            y = dict(curve).get(eta)
            if y is not None:
                ax.plot([eta], [y], marker="*", ms=14, color=color, mec="black")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("eta (server learning rate; 0 = base model)")
    ax.set_ylabel("normalized accuracy (mean over tasks, runs)")
    ax.plot([], [], color="gray", label=split)
    ax.plot([], [], color="gray", ls="--", label="val" if split == "test" else "test")
    ax.set_title("accuracy vs eta, each method at its best setting (* = eta chosen on val)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _atomic_savefig(fig, path)


def _plot_heatmap(scores: list[dict[str, Any]], path: Path, split: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from fl_merge.report import _atomic_savefig

    methods = list(dict.fromkeys(s["method"] for s in scores))
    settings = list(dict.fromkeys(s["setting"] for s in scores))
    grid = np.full((len(methods), len(settings)), np.nan)
    for s in scores:
        grid[methods.index(s["method"]), settings.index(s["setting"])] = s["normalized_accuracy"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(settings) + 3), max(3.0, 0.5 * len(methods) + 2)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, j in itertools.product(range(len(methods)), range(len(settings))):
        if not math.isnan(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < np.nanmean(grid) else "black")
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xticks(range(len(settings)), [s if len(s) <= 40 else s[:37] + "..." for s in settings],
                  rotation=30, ha="right", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"normalized {split} accuracy at chosen eta")
    ax.set_title("method x setting")
    return _atomic_savefig(fig, path)


def _measures(rows: list[dict[str, Any]], run_dirs: list[str]) -> list[str]:
    """het_ measures (and swept numeric run-config keys) that differ across the runs."""
    first = {}
    for r in rows:
        first.setdefault(r["run_dir"], r)
    per_run = [first[d] for d in run_dirs]
    fields = run_config_fields()
    out = []
    for col in per_run[0]:
        if col.startswith(store.OVERRIDE_PREFIX):
            name = col.removeprefix(store.OVERRIDE_PREFIX).split(".")[-1]
            if name not in fields or name.endswith("seed"):
                continue  # seeds are replicates to average over, not a measure to plot against
        elif not col.startswith("het_"):
            continue
        else:
            name = col
        values = {r.get(col) for r in per_run}
        if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                   and not math.isnan(v) for v in values):
            out.append(name)
    return list(dict.fromkeys(out))


def report_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fl-merge report",
        description="Best setting per method, and plots in <dir>/report/, for a sweep or run dir.")
    parser.add_argument("dir", help="a multirun sweep dir (or one run's dir, or a dir of run dirs)")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--measure", action="append",
                        help="het_ measure or run-config key for the accuracy-vs-heterogeneity "
                             "plot (repeatable; default: every one that differs across runs)")
    args = parser.parse_args(argv)
    from fl_merge.report import across_runs_figure

    try:
        rows = store.load_sweep(args.dir)
    except (ValueError, OSError) as e:
        print(f"fl-merge report: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.dir).resolve() / "report"
    scores = store.setting_scores(rows, args.split)
    best = store.best_settings(rows, args.split)
    if not best:
        print(f"fl-merge report: error: no selected merged rows on split {args.split}", file=sys.stderr)
        return 2
    width = max(len(b["method"]) for b in best) + 2
    common = store.common_overrides(rows)
    runs = len({r["run_dir"] for r in rows})
    print(f"{runs} run(s) in {Path(args.dir).resolve()}"
          + (f"; all with: {' '.join(common)}" if common else ""))
    print(f"best setting per method (mean normalized {args.split} accuracy at the eta chosen on val):")
    print(f"{'method':<{width}}{'normalized':>11}{'accuracy':>10}  {'eta':<10}{'runs':>5}  setting")
    for b in sorted(best, key=lambda b: -b["normalized_accuracy"]):
        etas = ",".join(f"{e:g}" for e in b["etas"])
        print(f"{b['method']:<{width}}{b['normalized_accuracy']:>11.3f}{b['accuracy']:>10.3f}  "
              f"{etas:<10}{b['runs']:>5}  {b['setting']}")
    written = [results_path := out / "best.csv"]
    results.write_rows(results_path, [{**b, "etas": ",".join(f"{e:g}" for e in b["etas"])} for b in best])
    written.append(_plot_eta(rows, best, out / "accuracy_vs_eta.png", args.split))
    written.append(_plot_heatmap(scores, out / "method_setting_heatmap.png", args.split))
    run_dirs = [d for d in dict.fromkeys(r["run_dir"] for r in rows)
                if (Path(d) / results.RESULTS_FILE).is_file()]
    if len(run_dirs) > 1:
        for measure in args.measure or _measures(rows, run_dirs):
            try:
                written.append(across_runs_figure(run_dirs, measure, out / f"across_{measure}.png",
                                                  split=args.split))
            except ValueError as e:
                print(f"fl-merge report: skipped {measure}: {e}", file=sys.stderr)
    print("\nwritten:")
    for p in written:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
