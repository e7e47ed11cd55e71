"""`fl-merge` runs and sweeps: Hydra's app, one `fl_merge.engine.run.run` per job.

Every job of a command is composed and validated (`fl_merge.cli.mapping.plan`) before
anything trains; a bad config is one line on stderr and exit code 2. Each job then runs
through `fl_merge.engine.run.run` (Flower's simulation engine in a child process); a failed job
stops the command with exit code 1. In a sweep every job appends its tidy rows to
``<sweep dir>/results.csv`` (`fl_merge.io.store`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_merge.io import results

from fl_merge.io import store
from fl_merge.cli.mapping import CONFIG_DIR, CONFIG_NAME, Job, _is_hydra_override, build_job, plan
from fl_merge.config.run_config import ConfigError
from fl_merge.cli.usage import help_page, version_line
from fl_merge.round.failures import EXIT_STATUS_HELP, lost_clients_exit, lost_clients_report

SUMMARY = "fl_merge.cli.callbacks.SweepSummary"
# Hydra flags after which we do not plan/validate jobs ourselves (Hydra handles them);
# -h/--help and --version are fl-merge's own (fl_merge.cli.usage), Hydra's help is --hydra-help.
_HYDRA_PASSTHROUGH = {"--hydra-help", "--cfg", "-c", "--info", "-i",
                      "--shell-completion", "-sc", "--experimental-rerun", "--resolve",
                      "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"}


class Sweep:
    """State shared by the Hydra task function across a command's jobs."""

    def __init__(self, jobs: list[Job] | None, multirun: bool):
        self.jobs = jobs
        self.multirun = multirun
        self.done = 0
        self.exit_code = 0  # LOST_CLIENTS_EXIT once a job's results lost clients it did not allow
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

    def fail(self, code: int, message: str) -> None:
        self.say(f"fl-merge: error: {message}", err=True)
        raise SystemExit(code)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # A launcher that runs jobs in other processes (hydra/launcher=joblib) pickles the task
    # function with this state: a copy there has no progress bar and its counts stay there
    # (the sweep summary is read from the sweep store, fl_merge.cli.callbacks).
    def __getstate__(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "multirun": self.multirun}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["jobs"], False)
        self.multirun = state["multirun"]


def _job_line(rows: list[dict[str, Any]], meta: Mapping[str, Any]) -> str:
    scores = []
    for method, eta in results.chosen_etas(rows).items():
        sel = [r["normalized_accuracy"] for r in rows if r["model"] == "merged" and r["split"] == "test"
               and r["method"] == method and r["selected"] is True]
        scores.append(f"{method} {sum(sel) / len(sel):.3f} (eta={eta:g})")
    clients = meta.get("clients") or []
    cached = sum(int(c.get("cached", 0)) for c in clients)
    return f"normalized test acc: {', '.join(scores)}; {cached}/{len(clients)} clients cached"


def _planned(state: Sweep, cfg: Any, overrides: Sequence[str]) -> Job | None:
    """The job `plan` composed and resolved before anything ran, when this is it (the same
    overrides mapping to the same run config): it is not resolved again. Its plugins are
    registered in this process (a Hydra launcher may run the job in another one)."""
    from fl_merge.cli.mapping import to_flower
    from fl_merge.config.plugins import PluginError, load_plugins

    flower, _ = to_flower(cfg)
    for job in state.jobs or []:
        if job.overrides == list(overrides) and job.flower == flower and job.resolved is not None:
            try:
                load_plugins(job.run.plugins)
            except PluginError as e:
                raise ConfigError(str(e)) from None
            return job
    return None


def task(cfg: Any, state: Sweep) -> None:
    """Hydra's task function: one job through `fl_merge.engine.run.run`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fl_merge.engine.run import RunFailed, run

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job_dir = Path(hc.runtime.output_dir)
    overrides = [o for o in hc.overrides.task if not _is_hydra_override(o)]
    num = int(hc.job.num) if multirun else 0
    total = len(state.jobs) if state.jobs else "?"
    where = f"job {num + 1}/{total} [{' '.join(overrides) or '(defaults)'}]" if multirun else "run"
    try:
        job = _planned(state, cfg, overrides) or build_job(cfg, overrides)
    except ConfigError as e:
        state.fail(2, f"{where}: {e}")
    resolved = job.resolved  # resolved once (plan's build_job); run() takes it as it is
    if not job.run.output_dir:
        resolved = resolved.with_output_dir(job_dir)
        job.run = resolved.run
    t0 = time.monotonic()
    try:
        # Pretrains (or loads) the base here, with a progress bar in a terminal.
        outcome = run(resolved, num_supernodes=job.num_supernodes, client_gpus=job.client_gpus,
                      stream=not multirun, progress=not multirun)
    except ConfigError as e:  # found before any process started (e.g. merge-keys vs theta0)
        state.fail(2, f"{where}: {e}")
    except RunFailed as e:
        state.fail(1, f"{where} failed: {e}")
    if multirun:
        sweep_dir = Path(hc.sweep.dir).resolve()
        state.sweep_dir = sweep_dir
        store.append_rows(sweep_dir / results.RESULTS_FILE, store.job_rows(
            outcome.rows, num, os.path.relpath(outcome.out_dir, sweep_dir), overrides,
            store.config_hash(job.run.to_flower())))
        state.done += 1
        state.say(f"{where}: {_job_line(outcome.rows, outcome.meta)} [{time.monotonic() - t0:.0f}s]")
        if state.bar is not None:
            state.bar.update(1)
    else:
        print()
        print(results.format_summary(outcome.rows, "fl-merge: test accuracy per task "
                                                   "(merged at the eta chosen on validation)"))
        print(f"\nresults: {outcome.out_dir}")
    for line in lost_clients_report(outcome.meta, job.run.min_clients, job.run.num_clients):
        state.say(f"fl-merge: {where}: {line}" if multirun else f"fl-merge: {line}", err=True)
    state.exit_code = max(state.exit_code, lost_clients_exit(outcome.meta, job.run.min_clients))


def _hydra(argv: Sequence[str], state: Sweep) -> None:
    import hydra

    def job(cfg: Any) -> None:
        task(cfg, state)

    old = sys.argv
    sys.argv = ["fl-merge", *argv, f"+hydra.callbacks.fl_merge_summary._target_={SUMMARY}"]
    try:
        hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base="1.3")(job)()
    finally:
        sys.argv = old
        if "--help" in argv or "-h" in argv:  # after Hydra's page: what fl-merge's exit codes mean
            print(EXIT_STATUS_HELP)


def main(argv: Sequence[str]) -> int:
    """`fl-merge [overrides]` / `fl-merge -m [sweep overrides]`; returns the exit code."""
    if "--version" in argv:
        print(version_line("fl-merge"))
        return 0
    if "-h" in argv or "--help" in argv:
        try:
            print(help_page([a for a in argv if not a.startswith("-")]))
        except ConfigError as e:
            print(f"fl-merge: error: {e}", file=sys.stderr)
            return 2
        return 0
    multirun = "-m" in argv or "--multirun" in argv
    jobs: list[Job] | None = None
    if not any(a.split("=", 1)[0] in _HYDRA_PASSTHROUGH for a in argv):
        try:
            jobs = plan([a for a in argv if not a.startswith("-")], multirun)
        except ConfigError as e:
            print(f"fl-merge: error: {e}", file=sys.stderr)
            return 2
    state = Sweep(jobs, multirun)

    interrupted: list[int] = []

    def _interrupt(signum: int, _frame: Any) -> None:  # Ctrl-C, terminal closed, `kill`
        interrupted.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def _stopped() -> int:
        state.close()
        where = state.sweep_dir / results.RESULTS_FILE if state.sweep_dir else "the job dirs"
        print(f"\nfl-merge: interrupted after {state.done} completed job(s); their rows are in {where}",
              file=sys.stderr)
        return 130

    previous = {sig: signal.signal(sig, _interrupt)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _hydra(argv, state)
    except KeyboardInterrupt:
        return _stopped()
    except SystemExit as e:
        # An interrupt inside Hydra's composition of the next job comes out as Hydra's
        # error and exit 1: it is still an interrupt.
        if interrupted:
            return _stopped()
        state.close()
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        state.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return state.exit_code  # a multirun's summary: fl_merge.cli.callbacks.SweepSummary
