"""Registries that load the built-ins on first use.

The task, model and merge-method registries import none of the modules that register into
them. Instead every registry table is a `BuiltinRegistry`: its first read or write calls
`ensure_builtins()`, which imports `fl_merge.builtins` (the one list of built-in tasks,
models and methods) once per process, by name. So a lookup such as
``get_model_spec("mnist-cnn")`` or ``load_task("rotate90")`` finds the built-ins in any
process (the CLI, a Flower ClientApp or ServerApp, a Ray worker) without the caller importing
anything special, and the static import graph stays acyclic: the registries sit below their
registrants, which sit below `fl_merge.builtins`.

This module imports nothing of fl-merge's own.
"""

from __future__ import annotations

import importlib
import threading
from collections import UserDict

BUILTINS_MODULE = "fl_merge.builtins"

_lock = threading.RLock()
_loaded = False
_loading = False


def ensure_builtins() -> None:
    """Import `fl_merge.builtins` once. Registrations made while it loads (it re-enters
    here) return at once; other threads wait until it has loaded. A failed load is retried
    by the next call."""
    global _loaded, _loading
    if _loaded:
        return
    with _lock:
        if _loaded or _loading:
            return
        _loading = True
        try:
            importlib.import_module(BUILTINS_MODULE)
            _loaded = True
        finally:
            _loading = False


class BuiltinRegistry(UserDict):
    """A name -> entry dict whose every access first makes sure the built-ins are loaded."""

    def __init__(self) -> None:  # no super().__init__: it would assign `data` (and load)
        self._entries: dict = {}

    @property
    def data(self) -> dict:
        ensure_builtins()
        return self._entries

    @data.setter
    def data(self, value: dict) -> None:  # UserDict.copy swaps `data` in and out
        self._entries = value
