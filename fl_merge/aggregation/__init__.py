"""Aggregation functions: one pure torch function per method, registered by name.

Importing this package registers every built-in method; `merge(method, task_vectors, ...)`
is the single entry point (see registry.merge).
"""

from fl_merge.aggregation import averaging, hetero, robust, sparsify, stock  # noqa: F401  (registers)
from fl_merge.aggregation.averaging import (
    eta_for_task_arithmetic,
    fedavg,
    fedgma,
    fednova,
    fednova_normaliser,
    fisher,
)
from fl_merge.aggregation.hetero import hetero as hetero_weighting
from fl_merge.aggregation.registry import (
    MergeMethod,
    available_methods,
    check_extras,
    check_method_params,
    get_method,
    known_extras,
    merge,
    normalisers_tensor,
    normalized_weights,
    register,
    resolve_device,
)
from fl_merge.aggregation.robust import (
    cclip,
    geometric_median,
    krum,
    median,
    multikrum,
    trimmed_mean,
)
from fl_merge.aggregation.scales import eta_for_lambda, lambda_for_eta, lambda_scale
from fl_merge.aggregation.sparsify import breadcrumbs, dare, ties
from fl_merge.aggregation.stock import mean_pairwise_cosine, model_stock, model_stock_ratio
from fl_merge.task_vectors import MergeInputError

__all__ = [
    "MergeInputError",
    "MergeMethod",
    "available_methods",
    "breadcrumbs",
    "cclip",
    "check_extras",
    "check_method_params",
    "dare",
    "eta_for_lambda",
    "eta_for_task_arithmetic",
    "fedavg",
    "fedgma",
    "fednova",
    "fednova_normaliser",
    "fisher",
    "geometric_median",
    "get_method",
    "hetero_weighting",
    "known_extras",
    "lambda_for_eta",
    "lambda_scale",
    "krum",
    "mean_pairwise_cosine",
    "median",
    "model_stock",
    "model_stock_ratio",
    "merge",
    "multikrum",
    "normalisers_tensor",
    "normalized_weights",
    "register",
    "resolve_device",
    "ties",
    "trimmed_mean",
]
