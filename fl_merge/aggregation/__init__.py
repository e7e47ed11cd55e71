"""Aggregation functions: one pure torch function per method, registered by name.

Importing this package registers every built-in method.
"""

from fl_merge.aggregation import averaging  # noqa: F401  (registers methods)
from fl_merge.aggregation.averaging import eta_for_task_arithmetic
from fl_merge.aggregation.registry import (
    MergeMethod,
    available_methods,
    check_method_params,
    get_method,
    merge,
    normalized_weights,
    register,
    resolve_device,
)

__all__ = [
    "MergeMethod",
    "available_methods",
    "check_method_params",
    "eta_for_task_arithmetic",
    "get_method",
    "merge",
    "normalized_weights",
    "register",
    "resolve_device",
]
