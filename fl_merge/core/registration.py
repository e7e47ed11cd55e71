"""Registries that load the built-ins on first use.

The task, model and merge-method registries import none of the modules that register into
them. Instead every registry table is a `BuiltinRegistry`: its first read or write calls
`ensure_builtins()`, which imports that registry's modules of built-ins (`METHOD_MODULES`:
fl_merge.methods, which imports every method file of its folder; `MODEL_MODULES`;
`TASK_MODULES`) once per process, by name. A lookup such
as ``get_model_spec("mnist-cnn")`` or ``load_task("rotate90")`` finds the built-ins in any
process (the CLI, a Flower ClientApp or ServerApp, a Ray worker) without the caller importing
anything special, and the static import graph stays acyclic: the registries sit below their
registrants. A plugin adds its own tasks or models by calling register_task /
register_model / register_model_family (or fl_merge.merging.registry.register) at its import.

This module imports nothing of fl-merge's own.
"""

from __future__ import annotations

import importlib
import threading
from collections import UserDict

# The modules whose import registers each kind of built-in, by registry. fl_merge.methods
# imports every method file of its folder itself: a new method is a new file, no line here.
METHOD_MODULES = ("fl_merge.methods",)
MODEL_MODULES = (
    "fl_merge.models.backbones",  # mnist-cnn, wide-mlp
    "fl_merge.models.hub",  # efficientnet-lite0, minilm-l6; hf:, timm:, open_clip: families
)
TASK_MODULES = (
    "fl_merge.tasks.image",  # the MNIST-family and vision8 tasks
    "fl_merge.tasks.text",  # the text suite
    "fl_merge.tasks.from_data",  # folder:, csv:, jsonl:, parquet:, hf: task families
)

_lock = threading.RLock()
_loaded: set[tuple[str, ...]] = set()
_loading: set[tuple[str, ...]] = set()


def ensure_builtins(modules: tuple[str, ...]) -> None:
    """Import `modules` once per process. Registrations made while they load (they re-enter
    here) return at once; other threads wait until they have loaded. A failed load is
    retried by the next call."""
    if modules in _loaded:
        return
    with _lock:
        if modules in _loaded or modules in _loading:
            return
        _loading.add(modules)
        try:
            for name in modules:
                importlib.import_module(name)
            _loaded.add(modules)
        finally:
            _loading.discard(modules)


class BuiltinRegistry(UserDict):
    """A name -> entry dict whose every access first makes sure its built-ins (`modules`)
    are loaded."""

    def __init__(self, modules: tuple[str, ...]) -> None:  # no super().__init__: it would
        self._modules = tuple(modules)  # assign `data` (and load)
        self._entries: dict = {}

    @property
    def data(self) -> dict:
        ensure_builtins(self._modules)
        return self._entries

    @data.setter
    def data(self, value: dict) -> None:  # UserDict.copy swaps `data` in and out
        self._entries = value
