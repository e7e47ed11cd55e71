"""fl-merge: model merging as one-shot federated learning.

Task vector tau_i = theta_i - theta0. An aggregator returns a mean-like update Delta and the
merged model is theta0 + eta * Delta; Task Arithmetic with lambda is one-shot FedAvg with
eta = K * lambda. A personal method (EMR) returns a `PersonalDeltas` instead, one model per
client: ``merge("emr", tvs).model(theta0, i)`` is client i's.

The public API is what this module names; docs/architecture.md maps the packages behind it.
Every public name is loaded on first use: ``import fl_merge`` loads no torch, and `run` and
`RunConfig` load Flower and Hydra's side of the library, so ``import fl_merge.methods`` stays
free of them.
"""

from __future__ import annotations

from typing import Any

from fl_merge.core.kernels import pin_cpu_kernels

# Before any kernel runs in this process or in those it starts: the same bits on every
# x86-64 machine (fl_merge/core/kernels.py; opt out with FL_MERGE_NATIVE_KERNELS=1).
pin_cpu_kernels()

__version__ = "0.1.0"

# name -> module of the public names, each loaded on first use (PEP 562): `import fl_merge`,
# which every `fl_merge.*` module runs first, loads no torch (fl_merge.deploy.launchers, the
# SuperNode launcher, stays as small as Flower's own flower-supernode).
_LAZY = {
    "MergeInputError": "fl_merge.core.task_vectors",
    "apply_update": "fl_merge.core.task_vectors",
    "split_state": "fl_merge.core.task_vectors",
    "task_vector": "fl_merge.core.task_vectors",
    "load_merged": "fl_merge.io.merged",
    "PersonalDeltas": "fl_merge.merging.personal",
    "available_methods": "fl_merge.methods",
    "merge": "fl_merge.methods",
    "eta_for_task_arithmetic": "fl_merge.methods.fedavg",
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
