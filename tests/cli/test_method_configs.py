"""Hydra config `method/<name>` for every registered method, derived from the method
function's signature (fl_merge.cli.schema.method_configs; no yaml repeats a default).

The configs are flat (`name` plus the parameters as top-level keys) so Hydra overrides read
`fl-merge method=ties method.density=0.3`."""

from __future__ import annotations

import inspect

import pytest
from hydra import compose, initialize_config_dir

from fl_merge import cli
from fl_merge.methods import available_methods, get_method, merge

# Arguments a method function receives from `merge`, not hyper-parameters.
NOT_PARAMS = {"stacked", "task_vectors", "p", "weights", "local_steps", "normalisers", "names", "extras",
              "device", "theta0", "stats"}


def composed_method(*overrides: str) -> dict:
    with initialize_config_dir(str(cli.CONFIG_DIR), version_base="1.3"):
        return dict(compose(cli.CONFIG_NAME, overrides=list(overrides)).method)


def test_known_methods_are_registered():
    assert set(available_methods()) >= {
        "fedavg", "task_arithmetic", "fednova", "fedgma", "median", "trimmed_mean", "cclip",
        "krum", "multikrum", "geometric_median", "ties", "dare", "breadcrumbs", "fisher",
        "hetero", "model_stock",
    }


@pytest.mark.parametrize("name", available_methods())
def test_every_method_composes_with_its_signature_defaults(name):
    """`method=<name>` is name plus the defaults written in the function's signature (read
    here with inspect, not through the registry), with the same types."""
    sig = inspect.signature(get_method(name).fn).parameters.values()
    expected = {p.name: p.default for p in sig
                if p.name not in NOT_PARAMS and p.default is not inspect.Parameter.empty}
    cfg = composed_method(f"method={name}")
    assert cfg.pop("name") == name
    assert "name" not in expected  # `name` is free to select the method
    assert cfg == expected
    assert {k: type(v) for k, v in cfg.items()} == {k: type(v) for k, v in expected.items()}


def test_no_method_yaml_repeats_the_defaults():
    assert not (cli.CONFIG_DIR / "method").exists() or not list((cli.CONFIG_DIR / "method").glob("*.yaml"))


def test_a_parameter_override_reaches_the_run_config():
    assert composed_method("method=ties", "method.density=0.3") == {"name": "ties", "density": 0.3,
                                                                    "convention": "fl-merge"}
    mapped = cli.to_flower(compose_root("method=ties", "method.density=0.3"))[0]
    assert mapped["method-params"] == "ties.density=0.3"


def compose_root(*overrides: str):
    with initialize_config_dir(str(cli.CONFIG_DIR), version_base="1.3"):
        return compose(cli.CONFIG_NAME, overrides=list(overrides))


@pytest.mark.parametrize("name", available_methods())
def test_composed_params_run_through_merge(name):
    import torch

    params = composed_method(f"method={name}")
    method = params.pop("name")
    k = 2 if get_method(method).min_clients and _refuses(method, params, 6) else 6  # slerp: 2
    tvs = [{"a": torch.randn(4, 3), "b": torch.randn(3)} for _ in range(k)]
    xs = [torch.randn(8, 3) for _ in range(k)]  # regmean: Grams of the inputs of "a" [4, 3]
    extras = {"fisher": [{"a": torch.rand(4, 3), "b": torch.rand(3)} for _ in range(k)],
              "gram": [{"a": x.T @ x / 8} for x in xs]}
    base = {"a": torch.randn(4, 3), "b": torch.randn(3)} if get_method(method).needs.theta0 else None
    out = merge(method, tvs, local_steps=[3] * k, extras=extras, theta0=base, **params)
    if get_method(method).personal:  # EMR: one model per client; check the first client's
        out = out.delta(0)
    assert set(out) == {"a", "b"} and out["a"].shape == (4, 3)
    assert bool(torch.isfinite(out["a"]).all())


def _refuses(method, params, k) -> bool:
    from fl_merge.core.task_vectors import MergeInputError
    from fl_merge.merging.registry import check_method_params
    try:
        check_method_params(method, params, k)
        return False
    except MergeInputError:
        return True
