"""Merge methods: one file per method, each registering itself by name.

A method file holds the method's pure torch function and, beside it in its ``register(...)``
call, everything the rest of fl-merge reads about it (fl_merge/merging/method.py says
what: parameters, search space, lambda units, per-tensor exactness, client statistics,
paper, formula). Importing this package imports every module of this folder, so a new method is one
new file here (docs/extending.md, "Add a method") and no list anywhere else.

May import: fl_merge.core and fl_merge.merging (the method contract and the streaming
helpers); nothing above them.
"""

from __future__ import annotations

import importlib
import pkgutil

from fl_merge.merging.registry import available_methods, get_method, merge, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["available_methods", "get_method", "merge", "register"]
