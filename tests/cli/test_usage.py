"""What the commands say about themselves: `fl-merge --help` (a page of fl-merge's own, not
Hydra's generic one), `--version` of every command, fl-merge-run's whole description, and the
"did you mean" of a mistyped key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fl_merge import cli
from fl_merge.cli import launch, mapping, usage
from fl_merge.cli.merge import main as merge_main
from fl_merge.cli.report_cli import main as report_main
from fl_merge.config.run_config import RunConfig
from fl_merge.core.values import did_you_mean

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def test_help_page_lists_subcommands_groups_and_real_defaults(capsys):
    assert cli.main(["--help"]) == 0
    page = capsys.readouterr().out
    for text in ("fl-merge report DIR", "fl-merge merge --base", "--hydra-help", "--version", "fl-merge-run"):
        assert text in page
    # Hydra's page showed every default as null and listed the internal _schema options
    assert "null" not in page.replace("null = the default", "") and "_schema" not in page
    defaults = RunConfig()
    for shown in (f"name={defaults.model}", f"num_clients={defaults.num_clients}",
                  f"local_steps={defaults.local_steps}", f"weighting={defaults.weighting}",
                  f"coef_objective={defaults.coef_objective}", f"merge_keys={defaults.merge_keys}"):
        assert f"  {shown}" in page or f" {shown} " in f" {page} ".replace("\n", " ")
    groups = page.split("config groups")[1].split("keys (")[0]
    options = {line.split()[0]: line.split()[1:] for line in groups.splitlines()
               if line.startswith("  ") and line.split()[0] in usage.GROUPS}
    assert "mnist_cnn*" in options["model"] and "efficientnet_lite0" in options["model"]
    assert "task_arithmetic*" in groups.split() and "headroom" in options["experiment"]


def test_help_with_overrides_shows_those_groups_keys(capsys):
    assert cli.main(["data=dirichlet", "data.alpha=0.1", "-h"]) == 0
    page = capsys.readouterr().out
    assert "dirichlet*" in page and "alpha=0.1" in page and "suite=" not in page
    assert cli.main(["-m", "method=fedavg,ties", "--help"]) == 0  # a sweep: its first job
    assert "fedavg*" in capsys.readouterr().out
    assert cli.main(["lamdas=0.3", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fl-merge: error: ") and "did you mean 'lambdas'?" in err and err.count("\n") == 1


def test_run_default_is_the_value_a_run_uses():
    assert usage.run_default("model.name", None) == RunConfig().model
    assert usage.run_default("data.alpha", None) == RunConfig().alpha
    assert usage.run_default("seed", None) == RunConfig().seed
    assert usage.run_default("data.alpha", 0.1) == 0.1  # set in the config tree
    assert usage.run_default("runtime.num_supernodes", None) == "<num_clients>"  # the CLI's own


@pytest.mark.parametrize("main, argv, prog", [
    (cli.main, ["--version"], "fl-merge"),
    (launch.main, ["--version"], "fl-merge-run"),
    (merge_main, ["--version"], "fl-merge merge"),
    (report_main, ["--version"], "fl-merge report"),
])
def test_every_command_prints_the_installed_version(main, argv, prog, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's version action
        code = e.code
    assert code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {_pyproject_version()}"


def test_version_through_the_installed_script():
    proc = subprocess.run([str(Path(sys.executable).parent / "fl-merge"), "--version"], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fl-merge {_pyproject_version()}"


def test_fl_merge_run_help_has_its_whole_description():
    text = " ".join(launch._parser().format_help().split())
    assert "`fl-merge-run`: one fl-merge run through `flwr run`" in text
    assert "), from any directory." in text  # the sentence the first line used to cut
    assert "What it adds to a bare `flwr run .`" in text and "--version" in text


def test_did_you_mean_only_for_a_close_key():
    assert did_you_mean("lamdas", ["lambdas", "lines", "seed"]) == " (did you mean 'lambdas'?)"
    assert did_you_mean("num-client", ["num-clients", "num-supernodes"]) == " (did you mean 'num-clients'?)"
    assert did_you_mean("alpha", ["lambdas", "lines", "seed"]) == ""


def test_key_hint_finds_the_key_in_another_group_or_a_letter_off():
    paths = ["model", "model.name", "training", "training.lr", "eval", "eval.etas", "lambdas", "seed"]
    assert mapping.key_hint("lr", paths) == " (did you mean 'training.lr'?)"
    assert mapping.key_hint("eval.etaz", paths) == " (did you mean 'eval.etas'?)"
    assert mapping.key_hint("modl", paths) == " (did you mean 'model'?)"
    assert mapping.key_hint("data.alpha", paths) == ""
