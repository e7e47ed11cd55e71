"""A Flower app directory that runs fl-merge's ServerApp, possibly with its own ClientApp
(docs/own_app.md): what its pyproject.toml declares and what follows from that.

Flower's rules, which fl-merge follows: the app's ``[tool.flwr.app.config]`` values are the
run's defaults, and a run may override only keys the app declares (Flower refuses any other
with "Invalid run configuration"). fl-merge's ServerApp takes RunConfig's default for every
fl-merge key the app does not declare; keys that are not fl-merge's belong to the app's own
ClientApp and are left to it. Pure functions but two: `check_client_app` imports the
app's ClientApp, inside `app_imports`, which holds the app's folder on sys.path meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fl_merge.config.parsing import ConfigError

# How an app names fl-merge's own components: installed (any app) or from this checkout.
FL_MERGE_SERVER_APPS = ("fl_merge_strategies.server_app:app", "strategies.server_app:app")
FL_MERGE_CLIENT_APPS = ("fl_merge_clients.client_app:app", "clients.client_app:app")
# fl-merge-run hands its private SuperLink the output dir it fixed, for an app that does not
# declare output-dir (Flower would refuse the key); the ServerApp reads it (strategies/server_app.py).
OUTPUT_DIR_VAR = "FL_MERGE_OUTPUT_DIR"
# Set by fl-merge-run, which writes run.log from the streamed output; without it (a bare
# `flwr run`) the ServerApp writes run.log itself.
LAUNCHER_LOG_VAR = "FL_MERGE_LAUNCHER_LOG"


@dataclasses.dataclass(frozen=True)
class FlowerApp:
    path: Path  # the app directory (absolute)
    config: dict[str, Any]  # [tool.flwr.app.config]: the keys it declares, with its values
    serverapp: str  # [tool.flwr.app.components]
    clientapp: str

    @property
    def own_clients(self) -> bool:
        """The app's ClientApp is not fl-merge's: its task names and model are the user's."""
        return self.clientapp not in FL_MERGE_CLIENT_APPS


def read_flower_app(directory: str | Path) -> FlowerApp:
    """The app in `directory` (its pyproject.toml); ConfigError (one line) when it is not a
    Flower app directory or its ServerApp is not fl-merge's."""
    path = Path(directory).expanduser().resolve()
    toml = path / "pyproject.toml"
    if not toml.is_file():
        raise ConfigError(f"--app {directory}: no pyproject.toml there (a Flower app directory has one)")
    try:
        with open(toml, "rb") as f:
            flwr = tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {})
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{toml} is not valid TOML: {e}") from None
    components = flwr.get("components", {})
    if not components.get("serverapp") or not components.get("clientapp"):
        raise ConfigError(f"{toml} has no [tool.flwr.app.components] serverapp and clientapp "
                          f"(a Flower app names both)")
    if components["serverapp"] not in FL_MERGE_SERVER_APPS:
        raise ConfigError(f"{toml}: serverapp = \"{components['serverapp']}\" is not fl-merge's; "
                          f"fl-merge-run runs serverapp = \"{FL_MERGE_SERVER_APPS[0]}\"")
    return FlowerApp(path, dict(flwr.get("config", {})), str(components["serverapp"]),
                     str(components["clientapp"]))


@contextlib.contextmanager
def app_imports(path: Path) -> Iterator[None]:
    """The app's directory first on sys.path while the launcher checks the app (its ClientApp,
    a ``python:`` base-checkpoint, plugins); afterwards sys.path is as it was. Left there, it
    leaked into every later child process: Flower's Ray backend copies sys.path into
    PYTHONPATH (a test session runs many apps in one process, and a later run got another
    app's ServerApp). The modules imported stay in sys.modules (registries refer to them)."""
    import sys

    before = list(sys.path)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path[:] = before


def check_client_app(app: FlowerApp) -> None:
    """The app's ClientApp imports and is a flwr ClientApp; ConfigError (one line) before
    anything starts otherwise. Run inside `app_imports(app.path)`."""
    import importlib

    from flwr.clientapp import ClientApp

    module, _, attr = app.clientapp.partition(":")
    try:
        found = getattr(importlib.import_module(module), attr)
    except Exception as e:  # the user's module: any error while importing it
        raise ConfigError(f"clientapp = \"{app.clientapp}\" of {app.path / 'pyproject.toml'} does not "
                          f"import: {type(e).__name__}: {e}") from None
    if not isinstance(found, ClientApp):
        raise ConfigError(f"clientapp = \"{app.clientapp}\" of {app.path / 'pyproject.toml'} is a "
                          f"{type(found).__name__}, not a flwr ClientApp")


def app_run_config(app: FlowerApp, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The run config a run of `app` gets: its declared values, `overrides` on top.
    ConfigError for an override of a key the app does not declare (Flower refuses it)."""
    undeclared = [k for k in overrides if k not in app.config]
    if undeclared:
        key = undeclared[0]
        from fl_merge.core.values import did_you_mean

        if hint := did_you_mean(key, app.config):  # a typo of a declared key
            raise ConfigError(f"run-config key '{key}' is not declared in {app.path / 'pyproject.toml'} "
                              f"[tool.flwr.app.config]{hint}")
        raise ConfigError(f"run-config key '{key}' is not declared in {app.path / 'pyproject.toml'} "
                          f"[tool.flwr.app.config], so Flower refuses to override it: declare it there "
                          f"(e.g. {key} = ...) or leave it out")
    return {**app.config, **overrides}


def split_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fl-merge's keys, the app's own keys) of a Flower run config: RunConfig's keys are
    fl-merge's, every other key is for the app's own ClientApp."""
    from fl_merge.config.run_config import flower_keys

    ours = set(flower_keys())
    return ({k: v for k, v in run_config.items() if k in ours},
            {k: v for k, v in run_config.items() if k not in ours})


def flower_overrides(app: FlowerApp, fl_merge_values: Mapping[str, Any],
                     app_values: Mapping[str, Any]) -> dict[str, Any]:
    """What `flwr run <app> --run-config` may send: every key the app declares, fl-merge's
    keys with the run's values (`fl_merge_values`, RunConfig.to_flower()), the app's own
    keys with `app_values` (its declared values or the user's overrides)."""
    return {k: fl_merge_values[k] if k in fl_merge_values else app_values.get(k, v)
            for k, v in app.config.items()}


def model_label(model: str, base_checkpoint: str, own_clients: bool) -> str:
    """The model's name in the merged files' metadata: `model`, except for the app's own
    clients with a base checkpoint and `model` left at RunConfig's default (mnist-cnn, which
    such a run never builds): then the checkpoint's name (its file, or its function)."""
    from fl_merge.config.run_config import RunConfig
    from fl_merge.round.base import PYTHON_PREFIX

    if not (own_clients and base_checkpoint and model == RunConfig.model):
        return model
    return base_checkpoint.rsplit(":", 1)[-1] if base_checkpoint.startswith(PYTHON_PREFIX) \
        else Path(base_checkpoint).name


def server_output_dir(run_output_dir: str, env: Mapping[str, str]) -> str:
    """The ServerApp's output-dir: the run config's, else the one fl-merge-run fixed for an
    app that does not declare the key (OUTPUT_DIR_VAR), else '' (RunConfig's default,
    ./outputs/<time>-<methods> under the ServerApp's working directory, made absolute)."""
    return run_output_dir or env.get(OUTPUT_DIR_VAR, "")
