"""Hydra callbacks of `fl-merge` (hydra.callbacks; they run where the sweep is launched,
whichever launcher runs the jobs)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from fl_merge.io import results


class SweepSummary(Callback):
    """After a multirun: how many jobs landed in the sweep's results.csv, and the report
    command. Read from the sweep store, so it is right also when the jobs ran in other
    processes (hydra/launcher=joblib)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        path = sweep_dir / results.RESULTS_FILE
        jobs = len({r["job"] for r in results.read_rows(path)}) if path.is_file() else 0
        print(f"fl-merge: {jobs} job(s) in {time.monotonic() - self.started:.0f}s; results: {path}\n"
              f"  best settings and plots: fl-merge report {sweep_dir}", flush=True)
