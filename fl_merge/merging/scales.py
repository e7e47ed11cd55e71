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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fl_merge.merging.registry import check_method_params, get_method

SCALES = ("sum", "delta")


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
