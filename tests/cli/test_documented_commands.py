"""Every `fl-merge ...` / `fl-merge-run ...` command written in README.md and docs/*.md
resolves: Hydra composition of every job and `RunConfig.resolve()` (no training), run from
a directory other than the checkout. Also: both CLIs start from any directory."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fl_merge import cli
from fl_merge.cli.hydra_app import _HYDRA_PASSTHROUGH
from fl_merge.config.run_config import ConfigError
from fl_merge.cli.launch import resolve_args

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A command: optional .venv/bin/, then fl-merge or fl-merge-run and its arguments.
COMMAND = re.compile(r"^(?:\.venv/bin/)?(fl-merge(?:-run)?)(?=\s|$)(.*)$")


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a # outside quotes)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return shlex.join(list(lexer))


def documented_commands() -> list[tuple[str, str]]:
    """(where, command line) of every fl-merge / fl-merge-run command in the docs: lines
    of fenced code blocks (a line ending in a backslash continues on the next) and inline
    code spans. `fl-merge report` takes a directory and `fl-merge merge` checkpoint files, not
    a run config: they are left out (tests/stats/test_report*.py and tests/cli/test_merge_cli.py)."""
    found = []
    for path in DOCS:
        fenced, lines = False, path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if fenced:
                while line.rstrip().endswith("\\") and n < len(lines):
                    line, n = line.rstrip()[:-1] + " " + lines[n].strip(), n + 1
            candidates = [line.strip()] if fenced else re.findall(r"`([^`]+)`", line)
            for text in candidates:
                m = COMMAND.match(text.strip())
                # (`fl-merge merge: error: ...` in docs is that command's output, left out too)
                if m and [w.rstrip(":") for w in m.group(2).split()[:1]] not in (["report"], ["merge"]):
                    found.append((f"{path.relative_to(ROOT)}:{n}", _strip_comment(text.strip())))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_of_both_clis():
    names = {shlex.split(c)[0].rsplit("/", 1)[-1] for _, c in COMMANDS}
    assert names == {"fl-merge", "fl-merge-run"}, COMMANDS
    assert len(COMMANDS) >= 10


def resolve_command(line: str) -> int:
    """Resolve a documented command's config the way the CLI does before it runs anything;
    returns the number of jobs. Raises ConfigError."""
    argv = shlex.split(line)
    prog, args = argv[0].rsplit("/", 1)[-1], argv[1:]
    if prog == "fl-merge-run":  # an --app path in the docs is relative to the checkout
        resolve_args([str(ROOT / a) if i and args[i - 1] == "--app" else a for i, a in enumerate(args)])
        return 1
    overrides, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.split("=", 1)[0] in _HYDRA_PASSTHROUGH:
            skip = "=" not in a and a in ("--cfg", "-c", "--info", "-i", "--package", "-p")
        elif not a.startswith("-"):
            overrides.append(a)
    return len(cli.plan(overrides, multirun="-m" in args or "--multirun" in args))


SETUP = "# make the example data"  # a docs snippet that makes the files its commands read


def documented_setups() -> list[str]:
    """The ```python blocks of the docs whose first line is SETUP (docs/data.md)."""
    blocks = []
    for path in DOCS:
        blocks += [b.split("```", 1)[0] for b in path.read_text().split("```python\n")[1:]
                   if b.startswith(SETUP)]
    return blocks


@pytest.fixture(scope="module")
def example_data():
    """Run the docs' setup snippets once, so the commands that read their files resolve."""
    for block in documented_setups():
        exec(compile(block, "docs setup snippet", "exec"), {})


@pytest.mark.parametrize("where, line", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_resolves(where, line, tmp_path, monkeypatch, example_data):
    assert "<" not in line and "..." not in line, \
        f"{where}: a placeholder in a command; write a concrete one: {line}"
    monkeypatch.chdir(tmp_path)
    try:
        jobs = resolve_command(line)
    except ConfigError as e:
        pytest.fail(f"{where}: `{line}` does not resolve: {e}")
    assert jobs >= 1
    assert list(tmp_path.iterdir()) == []  # resolving writes nothing


def test_resolution_catches_a_broken_command():
    """The check is real: a wrong key or value in a command fails it (krum with its fixed
    f=1 needs 5 clients; search=paper would search f over what K=4 allows)."""
    for bad, message in [("fl-merge attack=scale attack.nope=1", "attack.nope"),
                         ("fl-merge-run --run-config 'tasks=rotate90,invert,parity'",
                          "num-clients=4 but only 3 tasks"),
                         ("fl-merge -m method=fedavg,krum search=off", "job [method=krum search=off]: Krum with f=1")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            resolve_command(bad)


def test_attack_keys_work_with_every_attack():
    """attack_params, faults, fault_delay and min_clients are set with any attack (they
    were only in attack/none.yaml: 'not in struct'); a mapping is the params string."""
    job = cli.plan(["attack=scale", "attack.attack_params={factor:10}", "attack.faults=crash@0",
                    "attack.fault_delay=0.5", "attack.min_clients=2"], False)[0]
    assert (job.run.attack, job.run.attack_params, job.run.faults) == ("scale", "factor=10", "crash@0")
    assert (job.run.fault_delay, job.run.min_clients) == (0.5, 2)
    assert job.run.resolve().attack_plan.params == {"factor": 10.0}
    quoted = cli.plan(["attack=gaussian", "attack.attack_params='sigma=0.01'"], False)[0]
    assert quoted.run.resolve().attack_plan.params == {"sigma": 0.01}
    with pytest.raises(ConfigError, match="attack.min_clients=abc"):
        cli.plan(["attack=alie", "attack.min_clients=abc"], False)


@pytest.mark.parametrize("argv", [["-m", "fl_merge", "method=nope"],
                                  ["-m", "fl_merge.cli.launch", "--run-config", "method=nope"]])
def test_both_clis_validate_from_any_directory(argv, tmp_path):
    """From a directory that is not the checkout (fl-merge-run used to die there reading
    ./pyproject.toml): one error line, exit 2, nothing written."""
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
