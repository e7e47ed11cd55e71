"""A method's scale in its own paper's units: lambda <-> eta.

Every method returns a mean-like Delta and the merged model is theta0 + eta * Delta. Papers
scale differently, and each method declares which way at registration (`lambda_scale`):

* "sum": lambda multiplies the SUM of the K task vectors (Task Arithmetic, Ilharco et al.
  2023: theta0 + lambda * sum_i tau_i; DARE with TA, Model Breadcrumbs). Our Delta is a mean,
  so eta = K * lambda. Every averaging or robust FL aggregator (fednova, fedgma, median,
  trimmed_mean, cclip, krum, multikrum, geometric_median, fisher, hetero) follows this
  convention: its Delta stands where the mean stands, so the same lambda means the same step.
* "delta": lambda multiplies the method's own merged vector (TIES-Merging, Yadav et al. 2023:
  theta0 + lambda * tau_m with tau_m the disjoint mean; DARE-TIES): eta = lambda.
  Model Stock (Jang et al. 2024) too: its per-layer ratio t already sets the step
  (theta0 + t * mean_i tau_i), it has no scale of its own, so lambda = eta = 1 is the paper.

So `--lambda 0.3` means Task Arithmetic's lambda for every method, converted here.

Which scales are accepted is decided here too, once for every entry point (the run
config's `lambdas`/`etas`, OneShotMerge's settings, `fl-merge merge --lambda/--eta`):
`check_lambda` (positive and finite: 0 is the base itself, a negative lambda would subtract
the task vectors) and `check_eta` (finite and >= 0: 0 is the base, which a grid includes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.merging.registry import check_method_params, get_method

SCALES = ("sum", "delta")


def _scale_value(value: Any, name: str) -> float:
    """`value` (a number or its text, not a bool) as a float; MergeInputError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MergeInputError(f"{name} must be a number, got {value!r}")
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise MergeInputError(f"{name}: '{value}' is not a number") from None


def check_lambda(value: Any, name: str = "lambda") -> float:
    """`value` as a lambda (a method's scale in its paper's units): a positive finite
    number, else MergeInputError (a ValueError) naming `name`. The one rule for the run
    config's `lambdas` and for `fl-merge merge --lambda`."""
    lam = _scale_value(value, name)
    if not 0 < lam < math.inf:
        raise MergeInputError(f"{name} must be positive and finite, got {value!r} (0 is the base "
                              "itself; a negative lambda would subtract the task vectors)")
    return lam


def check_eta(value: Any, name: str = "eta") -> float:
    """`value` as an eta (the scale of the mean-like Delta): a finite number >= 0 (0 is the
    base), else MergeInputError naming `name`. The one rule for the run config's `etas` and
    for `fl-merge merge --eta`."""
    eta = _scale_value(value, name)
    if not 0 <= eta < math.inf:
        raise MergeInputError(f"{name} must be finite and >= 0, got {value!r} (0 is the base "
                              "itself; a negative eta would subtract the task vectors)")
    return eta


def lambda_scale(method: str, params: Mapping[str, Any] | None = None) -> str:
    """'sum' or 'delta': how `method` (with `params`) applies its paper's lambda."""
    m = get_method(method)
    full = check_method_params(method, dict(params or {}))
    scale = m.lambda_scale(full) if callable(m.lambda_scale) else m.lambda_scale
    if scale not in SCALES:
        raise ValueError(f"merge method '{method}' declares lambda_scale '{scale}', not one of {SCALES}")
    return scale


def eta_for_lambda(method: str, lam: float, num_models: int, params: Mapping[str, Any] | None = None
                   ) -> float:
    """The eta at which theta0 + eta * Delta(method) is the method's paper at `lam`."""
    if num_models < 1:
        raise ValueError(f"num_models must be at least 1, got {num_models}")
    return float(lam) * (num_models if lambda_scale(method, params) == "sum" else 1)


def lambda_for_eta(method: str, eta: float, num_models: int, params: Mapping[str, Any] | None = None
                   ) -> float:
    """Inverse of `eta_for_lambda`: the paper's lambda for a chosen eta."""
    return float(eta) / eta_for_lambda(method, 1.0, num_models, params)
