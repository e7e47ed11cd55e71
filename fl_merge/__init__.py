"""fl-merge: model merging as one-shot federated learning.

Task vector tau_i = theta_i - theta0. An aggregator returns a mean-like update Delta and the
merged model is theta0 + eta * Delta; Task Arithmetic with lambda is one-shot FedAvg with
eta = K * lambda. A personal method (EMR) returns a `PersonalDeltas` instead, one model per
client: ``merge("emr", tvs).model(theta0, i)`` is client i's.

The public API is what this module names; docs/architecture.md maps the packages behind it.
`run` and `RunConfig` load Flower and Hydra's side of the library on first use, so
``import fl_merge`` (and ``import fl_merge.methods``) stays free of them.
"""

from __future__ import annotations

from typing import Any

from fl_merge.core.task_vectors import MergeInputError, apply_update, split_state, task_vector
from fl_merge.io.merged import load_merged
from fl_merge.merging.personal import PersonalDeltas
from fl_merge.methods import available_methods, merge
from fl_merge.methods.fedavg import eta_for_task_arithmetic

__version__ = "0.1.0"

# name -> module of the public names loaded on first use (PEP 562)
_LAZY = {
    "run": "fl_merge.engine.run",
    "RunConfig": "fl_merge.config.run_config",
    "ConfigError": "fl_merge.config.run_config",
    "merge_files": "fl_merge.io.file_merge",
}

__all__ = [
    "ConfigError",
    "MergeInputError",
    "PersonalDeltas",
    "RunConfig",
    "apply_update",
    "available_methods",
    "eta_for_task_arithmetic",
    "load_merged",
    "merge",
    "merge_files",
    "run",
    "split_state",
    "task_vector",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fl_merge' has no attribute {name!r}")
