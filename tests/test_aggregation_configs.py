"""configs/method/<name>.yaml exists for every registered method, with its defaults.

The files are flat (`name` plus the parameters as top-level keys) so Hydra overrides read
`fl-merge method=ties method.density=0.3`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fl_merge.aggregation import available_methods, get_method, merge

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"


def test_known_methods_are_registered():
    assert set(available_methods()) >= {
        "fedavg", "task_arithmetic", "fednova", "fedgma", "median", "trimmed_mean", "cclip",
        "krum", "multikrum", "geometric_median", "ties", "dare", "breadcrumbs", "fisher",
        "hetero",
    }


@pytest.mark.parametrize("name", available_methods())
def test_every_method_has_a_yaml_with_its_defaults(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.is_file(), f"missing {path}"
    cfg = yaml.safe_load(path.read_text())
    assert cfg.pop("name") == name
    assert "name" not in get_method(name).params  # `name` is free to select the method
    assert cfg == get_method(name).params
    assert {k: type(v) for k, v in cfg.items()} == {
        k: type(v) for k, v in get_method(name).params.items()
    }


def test_no_stray_yaml():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(available_methods())


@pytest.mark.parametrize("name", available_methods())
def test_yaml_params_run_through_merge(name):
    import torch

    params = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    method = params.pop("name")
    k = 6
    tvs = [{"a": torch.randn(4, 3), "b": torch.randn(3)} for _ in range(k)]
    extras = {"fisher": [{"a": torch.rand(4, 3), "b": torch.rand(3)} for _ in range(k)]}
    out = merge(method, tvs, local_steps=[3] * k, extras=extras, **params)
    assert set(out) == {"a", "b"} and out["a"].shape == (4, 3)
    assert bool(torch.isfinite(out["a"]).all())
