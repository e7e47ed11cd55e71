"""A user's own Flower app (docs/own_app.md), decided before anything starts: its declared
config is the run's defaults, only declared keys may be overridden or sent, keys that are not
fl-merge's stay the app's, its own ClientApp names its tasks and model."""

from __future__ import annotations

import logging
import re
import types
from pathlib import Path

import pytest
import torch

from fl_merge.cli.launch import main as launch_main
from fl_merge.cli.launch import resolve_args
from fl_merge.config.flower_app import (
    OUTPUT_DIR_VAR,
    app_run_config,
    check_client_app,
    flower_overrides,
    model_label,
    read_flower_app,
    server_output_dir,
    split_run_config,
)
from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.round.base import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny-app"


def _app(tmp_path: Path, clientapp: str = "my_app.client:app", config: str = "num-clients = 2\n",
         serverapp: str = "fl_merge_strategies.server_app:app") -> Path:
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.flwr.app.components]\nserverapp = "{serverapp}"\nclientapp = "{clientapp}"\n'
        f"[tool.flwr.app.config]\n{config}")
    return tmp_path


def test_the_example_app_is_read_as_an_app_with_its_own_clients():
    app = read_flower_app(EXAMPLE)
    assert app.own_clients and app.clientapp == "tiny_app.client_app:app"
    assert app.config["tasks"] == "lo,mid,hi" and app.config["sgd-steps"] == 40
    assert not read_flower_app(ROOT).own_clients  # this checkout: fl-merge's own ClientApp


@pytest.mark.parametrize("setup, message", [
    (lambda p: p, "no pyproject.toml there"),
    (lambda p: (p / "pyproject.toml").write_text("[tool.flwr.app]\npublisher = 'x'\n") and p,
     "has no [tool.flwr.app.components] serverapp and clientapp"),
    (lambda p: _app(p, serverapp="my_app.server:app"), 'serverapp = "my_app.server:app" is not fl-merge\'s'),
])
def test_a_directory_that_is_not_an_fl_merge_app_is_one_line(tmp_path, setup, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_flower_app(setup(tmp_path))


def test_the_apps_values_are_the_defaults_and_only_declared_keys_may_be_overridden(tmp_path):
    app = read_flower_app(_app(tmp_path, config='num-clients = 2\nmethod = "ties"\nepochs = 3\n'))
    assert app_run_config(app, {"method": "fedavg"}) == {"num-clients": 2, "method": "fedavg", "epochs": 3}
    with pytest.raises(ConfigError, match=r"run-config key 'ensemble' is not declared in .*pyproject.toml "
                                          r"\[tool.flwr.app.config\], so Flower refuses"):
        app_run_config(app, {"ensemble": True})


def test_a_clientapp_that_does_not_import_is_one_line_before_start(tmp_path, capsys):
    (tmp_path / "my_app").mkdir()
    (tmp_path / "my_app" / "client.py").write_text("import not_installed_anywhere\n")
    assert launch_main(["--app", str(_app(tmp_path))]) == 2
    assert capsys.readouterr().err == (
        f'fl-merge-run: error: clientapp = "my_app.client:app" of {tmp_path / "pyproject.toml"} does not '
        "import: ModuleNotFoundError: No module named 'not_installed_anywhere'\n")
    (tmp_path / "my_app" / "client.py").write_text("app = 1\n")
    with pytest.raises(ConfigError, match="is a int, not a flwr ClientApp"):
        check_client_app(read_flower_app(tmp_path))


def test_keys_that_are_not_fl_merges_belong_to_the_app():
    ours, theirs = split_run_config({"num-clients": 3, "sgd-steps": 40, "merge-keys": "enc.*"})
    assert ours == {"num-clients": 3, "merge-keys": "enc.*"} and theirs == {"sgd-steps": 40}


def test_only_the_keys_the_app_declares_are_sent_with_the_runs_values(tmp_path):
    app = read_flower_app(_app(tmp_path, config='num-clients = 2\noutput-dir = ""\nepochs = 3\n'))
    run = RunConfig(num_clients=2, output_dir="/abs/out", ensemble=True).to_flower()
    sent = flower_overrides(app, run, {"epochs": 5})
    assert sent == {"num-clients": 2, "output-dir": "/abs/out", "epochs": 5}
    assert flower_overrides(app, run, {}) == {"num-clients": 2, "output-dir": "/abs/out", "epochs": 3}


def test_the_launcher_reads_the_apps_config_not_fl_merges_defaults(tmp_path, capsys, monkeypatch):
    """The issue's case: an app declaring 3 clients and two methods was run as fl-merge's
    4 clients with task_arithmetic."""
    monkeypatch.chdir(tmp_path)
    _, resolved, supernodes, _ = resolve_args(["--app", str(EXAMPLE), "--run-config", "sgd-steps=30"])
    assert (resolved.run.num_clients, supernodes, resolved.run.method) == (3, 3, "task_arithmetic,ties")
    assert resolved.tasks == ["lo", "mid", "hi"] and resolved.own_clients
    assert resolved.app_config == {"sgd-steps": 30, "sgd-lr": 0.3}
    assert resolved.run.ensemble is False  # not declared: RunConfig's default
    assert launch_main(["--app", str(EXAMPLE), "--seeds", "0,1"]) == 2
    assert "--seeds sets fl-merge's seed per replicate" in capsys.readouterr().err
    assert launch_main(["--app", str(EXAMPLE), "--run-config", "ensemble=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fl-merge-run: error: run-config key 'ensemble' is not declared")
    assert err.count("\n") == 1
    assert not (tmp_path / "outputs").exists()


def test_own_clients_name_their_tasks_fl_merges_clients_need_registered_ones():
    own = RunConfig(num_clients=3, tasks="lo,mid,hi", model="my-net",
                    base_checkpoint=f"python:{__name__}:_base")
    resolved = own.resolve(own_clients=True)
    assert resolved.tasks == ["lo", "mid", "hi"] and resolved.own_clients
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['lo', 'mid', 'hi'\]"):
        own.resolve()
    unnamed = RunConfig(num_clients=2, base_checkpoint=own.base_checkpoint).resolve(own_clients=True)
    assert unnamed.tasks == ["client-0", "client-1"]
    for bad, message in [({"tasks": "lo,lo,hi"}, "tasks repeat"), ({"data": "iid"}, "leave data=tasks"),
                         ({"base_checkpoint": ""}, "unknown model 'my-net'")]:
        with pytest.raises(ConfigError, match=message):
            RunConfig(**{**own.__dict__, **bad}).resolve(own_clients=True)


def _base() -> dict[str, torch.Tensor]:
    return {"enc.w": torch.ones(2, 2), "cls.w": torch.zeros(3, 2)}


def _linear() -> torch.nn.Module:
    return torch.nn.Linear(2, 3)


def _not_weights() -> list:
    return [1, 2]


def test_a_base_from_code_is_the_functions_state_dict_or_one_line():
    theta0 = load_checkpoint(f"python:{__name__}:_base")
    assert list(theta0) == ["enc.w", "cls.w"] and torch.equal(theta0["enc.w"], torch.ones(2, 2))
    assert sorted(load_checkpoint(f"python:{__name__}:_linear")) == ["bias", "weight"]  # a module
    for ref, message in [("python:nope_module:f", "cannot import it"),
                         (f"python:{__name__}", "write python:"),
                         (f"python:{__name__}:_not_weights", "must return a torch module or a non-empty")]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(ref)


def test_the_merged_files_name_the_users_model():
    assert model_label("tiny-mlp", "python:app.task:base_weights", True) == "tiny-mlp"
    assert model_label(RunConfig.model, "python:app.task:base_weights", True) == "base_weights"
    assert model_label(RunConfig.model, "/ckpt/base.safetensors", True) == "base.safetensors"
    assert model_label(RunConfig.model, "/ckpt/base.safetensors", False) == RunConfig.model


def test_the_serverapp_output_dir_is_the_runs_else_the_launchers_else_the_default():
    assert server_output_dir("/a", {OUTPUT_DIR_VAR: "/b"}) == "/a"
    assert server_output_dir("", {OUTPUT_DIR_VAR: "/b"}) == "/b"
    assert server_output_dir("", {}) == ""


def test_a_bare_flwr_run_finds_its_app_and_writes_run_log(tmp_path, monkeypatch):
    """What the ServerApp reads under `flwr run .`: the app Flower installed (here laid out
    as Flower lays it out under FLWR_HOME) tells it the ClientApp is the user's; its log
    lines go to <output dir>/run.log."""
    from flwr.common.config import get_project_dir
    from flwr.common.logger import log

    from fl_merge_strategies.server_app import installed_app, run_log

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    fab = dict(fab_id="fl-merge-example/tiny-app", fab_version="1.0.0", fab_hash="ab" * 32)
    installed = get_project_dir(**fab)
    installed.mkdir(parents=True)
    (installed / "pyproject.toml").write_text((EXAMPLE / "pyproject.toml").read_text())
    app = installed_app(types.SimpleNamespace(run=types.SimpleNamespace(**fab)))
    assert app is not None and app.own_clients
    assert installed_app(types.SimpleNamespace(run=types.SimpleNamespace(fab_id="", fab_version="",
                                                                         fab_hash=""))) is None
    out = tmp_path / "out"
    with run_log(out, enabled=True):
        log(logging.INFO, "fl-merge: output %s", out)
    log(logging.INFO, "after the run")
    assert (out / "run.log").read_text() == f"INFO     fl-merge: output {out}\n"
    with run_log(tmp_path / "launched", enabled=False):
        log(logging.INFO, "fl-merge-run writes this one")
    assert not (tmp_path / "launched").exists()


def test_checking_an_app_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    """The launcher puts the app's folder on sys.path for its checks only. (Left there, the app leaked into every later child process of
    the test session through Flower's Ray backend, which copies sys.path into PYTHONPATH: a
    later fl-merge-run there ran another app's ServerApp.)"""
    import sys

    monkeypatch.chdir(tmp_path)
    path = list(sys.path)
    resolve_args(["--app", str(EXAMPLE)])
    assert sys.path == path
