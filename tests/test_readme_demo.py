"""The README's demo table comes out of a fresh run unchanged (issue 29 item 9).

`make demo` is `fl-merge-run` with no arguments. This runs exactly that (its own output
directory, the test session's empty model cache: theta0 pretrained and the 4 clients trained
here, as on a fresh clone) and compares the per-task table it prints, digit for digit, with
the block the README shows, and the chosen lambda with the README's log line. When the code
changes what the demo computes, this fails until the README is re-measured."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TITLE = "fl-merge: test accuracy per task"


def readme_tables(text: str) -> list[list[str]]:
    """The lines of each of the README's fenced blocks that start with the demo's title: one
    (fl-merge pins the CPU kernels, fl_merge/core/kernels.py, so every x86-64 machine prints
    the same table)."""
    blocks, block = [], None
    for line in text.splitlines():
        if line.startswith("```") and block is None:  # a fence opens a block ...
            block = []
        elif line.startswith("```"):  # ... and the next one closes it
            blocks.append(block)
            block = None
        elif block is not None:
            block.append(line)
    found = [b for b in blocks if b and b[0].startswith(TITLE)]
    assert len(found) == 1, f"README.md has {len(found)} demo tables starting with {TITLE!r}"
    return found


def printed_table(stdout: str) -> list[str]:
    """The summary table a run prints: from its title to the `normalized` line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(TITLE))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("normalized"))
    return lines[start:end + 1]


def test_readme_table_is_parsed_from_its_block():
    text = "```bash\nmake demo\n```\nx\n```\n" + TITLE + " (a)\ntask  base\nmean  0.5\nnormalized  -\n```\n```\nother\n```\n"
    assert readme_tables(text) == [[TITLE + " (a)", "task  base", "mean  0.5", "normalized  -"]]
    run = "log\n" + TITLE + " (a)\ntask  base\nnormalized  -\n\nresults: out\n"
    assert printed_table(run) == [TITLE + " (a)", "task  base", "normalized  -"]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_readme_demo_reproduces(tmp_path):
    """`make demo` as a user runs it (also the launcher's path through a real local SuperLink:
    status read back, summary printed, nothing left running)."""
    readme = (ROOT / "README.md").read_text()
    expected = readme_tables(readme)
    demo = tmp_path / "demo"
    # from a directory that is not the checkout, without --app (it used to die there)
    out = subprocess.run([sys.executable, "-m", "fl_merge.cli.launch", "--run-config",
                          f"output-dir={demo}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    # the launcher's own SuperLink is stopped, and the streamed `flwr run` output is kept
    ports = [int(p) for p in re.findall(r"Using SuperLink: local \(127\.0\.0\.1:(\d+)\)",
                                        out.stdout + out.stderr)]
    assert ports and not any(port_open(p) for p in ports), ports
    assert (demo / "run.log").stat().st_size > 0 and f"results: {demo}" in out.stdout
    assert printed_table(out.stdout) in expected, (
        "the default demo no longer prints README.md's table: re-measure it (`make demo`) and "
        "update the README\n" + "\n".join(printed_table(out.stdout)))
    chosen = re.search(r"task_arithmetic: lambda=([0-9.]+) \(eta=([0-9.]+)\), chosen on validation",
                       out.stdout)
    assert chosen, out.stdout[-2000:]
    # the log line the README gives right after the table that matched
    after = readme[readme.index("\n".join(printed_table(out.stdout))):]
    line = re.search(r"`task_arithmetic: lambda=([0-9.]+) \(eta=([0-9.]+)\), chosen on validation", after)
    assert line and line.groups() == chosen.groups(), (chosen[0], line and line[0])
