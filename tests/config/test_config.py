"""Run configuration: one source of defaults, clear one-line errors before any training."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.cli.launch import main as launch_main
from fl_merge.core.seeds import client_seeds

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_run_config_mirrors_runconfig_defaults():
    with open(ROOT / "pyproject.toml", "rb") as f:
        flwr_config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert flwr_config == RunConfig().to_flower()
    # And the defaults resolve: the demo config is valid.
    cfg = RunConfig.from_flower(flwr_config).resolve()
    assert len(cfg.tasks) == cfg.run.num_clients == 4
    assert cfg.etas[0] == 0.0


def test_per_client_training_values_expand_by_partition():
    cfg = RunConfig.from_flower({"num-clients": 3, "local-steps": "10,20,30", "lr": 0.05}).resolve()
    assert cfg.local_steps == [10, 20, 30]
    assert cfg.lrs == [0.05] * 3
    train = cfg.train_config()
    assert train["local-steps"] == [10, 20, 30]  # heterogeneous: a list by partition id
    assert train["lr"] == 0.05  # uniform: a scalar any standard client can read
    assert train["seed"] == client_seeds(0, 3)  # one independent stream per client
    assert train["tasks"] == cfg.tasks
    offset = RunConfig.from_flower({"num-clients": 3, "seed": 5, "client-seeds": "offset"}).resolve()
    assert offset.train_config()["seed"] == [5, 6, 7]  # the scheme of the numbers before Dec 2026


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "nope"}, "unknown merge method 'nope'"),
        ({"client-seeds": "random"}, "client-seeds must be one of spawn, offset"),
        ({"tasks": "rotate90,nope"}, "unknown task(s) ['nope']"),
        ({"suite": "nope"}, "unknown task suite 'nope'"),
        ({"num-clients": 9}, "num-clients=9 but only 8 tasks are available"),
        ({"local-steps": ""}, "local-steps is missing"),
        ({"local-steps": "10,20"}, "local-steps lists 2 values for 4 clients"),
        ({"local-steps": "0"}, "local-steps must be positive"),
        ({"lr": "fast"}, "lr: 'fast' is not a valid float"),
        ({"method-params": "rho=0.5"}, "unknown parameter(s) ['rho'] for merge method"),
        ({"weighting": "size"}, "weighting must be"),
        # with search=paper krum searches f over what K allows (f=0 on 4 clients): see test_search
        ({"method": "krum", "search": "off"}, "needs more than 2f+2 = 4 clients, got 4"),
        ({"method": "krum", "method-params": "f=1"}, "needs more than 2f+2 = 4 clients, got 4"),
        ({"method": "ties", "method-params": "density=2"}, "density"),
        ({"etas": "0"}, "etas must be non-negative with at least one above 0"),
        ({"no-such-key": 1}, "unknown run-config key 'no-such-key'; known: num-clients"),
        ({"lamdas": "0.3"}, "unknown run-config key 'lamdas' (did you mean 'lambdas'?); known:"),
    ],
)
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower(overrides).resolve()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run-config", "method=nope"], "unknown merge method 'nope'"),
        (["--run-config", "num-clients=9"], "only 8 tasks are available"),
        (["--run-config", 'local-steps=""'], "local-steps is missing"),
        (["--run-config", "num-clients=4", "--num-supernodes", "2"],
         "num-clients=4 is larger than the 2 available clients"),
        (["--run-config", "lamdas=0.3"], "(did you mean 'lambdas'?)"),
        (["--run-config", "no-such.toml"], "--run-config no-such.toml: no such file"),
    ],
)
def test_launcher_rejects_bad_config_before_starting_anything(args, message, capsys, tmp_path):
    out = tmp_path / "out"
    code = launch_main(["--app", str(ROOT), "--run-config", f'output-dir="{out}"', *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fl-merge-run: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists()  # nothing written, nothing trained


def test_several_methods_and_their_parameters():
    cfg = RunConfig.from_flower({"method": "fedavg,ties,dare",
                                 "method-params": "ties.density=0.3 drop_rate=0.5"}).resolve()
    methods = dict(cfg.methods)
    assert list(methods) == ["fedavg", "ties", "dare"]
    assert methods["fedavg"] == {}
    assert methods["ties"]["density"] == 0.3  # prefixed: that method only
    assert methods["dare"] == {"drop_rate": 0.5}  # ties.density did not leak into dare
    for bad, message in [
        ({"method": "fedavg,ties", "method-params": "rho=0.5"}, "unknown parameter(s) ['rho']"),
        ({"method": "fedavg", "method-params": "ties.density=0.5"}, "'ties' is not among the methods"),
        ({"method": "fedavg,fedavg"}, "lists a method twice"),
        ({"method": ","}, "method is empty"),
    ]:
        with pytest.raises(ConfigError) as err:
            RunConfig.from_flower(bad).resolve()
        assert message in str(err.value)


def test_run_config_toml_file_read_or_named_when_wrong(tmp_path):
    from fl_merge.cli.launch import _parse_run_config

    good = tmp_path / "run.toml"
    good.write_text('method = "ties"\nnum-clients = 3\n')
    assert _parse_run_config([str(good), "seed=2"]) == {"method": "ties", "num-clients": 3, "seed": 2}
    bad = tmp_path / "bad.toml"
    bad.write_text("method = \n")
    with pytest.raises(ConfigError, match=r"bad.toml is not valid TOML: Invalid value \(at line 1"):
        _parse_run_config([str(bad)])
    with pytest.raises(ConfigError, match="is not key=value"):  # a plain word is still that
        _parse_run_config(["ties"])


def test_boolean_keys_accept_toml_and_text():
    assert RunConfig.from_flower({"cache": False}).cache is False
    assert RunConfig.from_flower({"cache": "true"}).cache is True
    with pytest.raises(ConfigError, match="cache: 'maybe' is not true or false"):
        RunConfig.from_flower({"cache": "maybe"})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_refused_before_anything_trains(capsys):
    with pytest.raises(ConfigError, match="device=cuda but torch sees no CUDA GPU on this "
                                          r"machine \(torch .*\): use device=auto or device=cpu"):
        RunConfig(device="cuda").resolve()
    assert launch_main(["--run-config", "device=cuda"]) == 2
    assert "device=cuda but torch sees no CUDA GPU" in capsys.readouterr().err


def test_headroom_suite_and_preset_resolve():
    """suite=headroom names its 3 tasks, and `fl-merge +experiment=headroom` maps to the run
    docs/headroom.md measured: those tasks, 3 clients, 50 local steps, the CNN, search=paper
    over the default 40 lambdas."""
    from hydra import compose, initialize_config_dir

    from fl_merge.tasks.registry import suite_tasks
    from fl_merge.merging.search import LAMBDAS
    from fl_merge.cli.mapping import CONFIG_DIR, CONFIG_NAME, build_job

    assert suite_tasks("headroom") == ["rotate90", "invert", "patch-shuffle"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        job = build_job(compose(CONFIG_NAME, overrides=["+experiment=headroom"]))
    cfg = job.run.resolve()
    assert cfg.tasks == ["rotate90", "invert", "patch-shuffle"] and job.run.num_clients == 3
    assert cfg.local_steps == [50, 50, 50] and cfg.lrs == [0.01] * 3 and job.run.model == "mnist-cnn"
    assert job.run.search == "paper" and cfg.lambdas == list(LAMBDAS)
    assert job.run.client_seeds == "offset"  # the seed scheme its documented numbers used
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        v2 = build_job(compose(CONFIG_NAME, overrides=["+experiment=headroom_v2"]))
    # the suite chosen on validation (docs/headroom_design.csv): 4 tasks, 150 steps, new seeds
    assert v2.run.resolve().tasks == ["rotate90", "invert", "noise", "patch-shuffle"]
    assert v2.run.resolve().local_steps == [150] * 4 and v2.run.client_seeds == "spawn"


# Text -> value, written out by hand: what every place that reads a value from text gives.
VALUES = [("0.3", 0.3), ("2", 2), ("-4", -4), ("1e-3", 0.001), ("true", True), ("False", False),
          ("TRUE", True), ("ties", "ties"), ("0.1..0.3", "0.1..0.3"), ("a,b", "a,b")]


def test_every_value_read_from_text_goes_through_one_parser(tmp_path):
    import math

    from fl_merge.cli.launch import _parse_run_config
    from fl_merge.cli.merge import parse_params
    from fl_merge.config.parsing import parse_method_params
    from fl_merge.core.values import parse_value
    from fl_merge.io.results import read_rows

    (tmp_path / "cells.csv").write_text("cell\n" + "\n".join(f'"{t}"' for t, _ in VALUES) + "\n")
    cells = [r["cell"] for r in read_rows(tmp_path / "cells.csv")]
    for (text, want), cell in zip(VALUES, cells):
        got = {"parse_value": parse_value(text),
               "method-params": parse_method_params(f"x={text}")["x"] if "," not in text else want,
               "fl-merge merge --param": parse_params([f"x={text}"])["x"],
               "fl-merge-run --run-config": _parse_run_config([f"x={text}"])["x"],
               "results CSV": cell}
        for where, value in got.items():
            assert value == want and type(value) is type(want), (where, text, value)
    assert math.isnan(parse_value("nan")) and parse_value("") == ""
    assert parse_method_params("rho=0.1|true|x") == {"rho": [0.1, True, "x"]}
