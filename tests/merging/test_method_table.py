"""The docs' method table is rendered from the registry, and the committed one is current."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_merge.merging.method_table import BEGIN, END, method_table, with_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def test_the_committed_table_is_the_rendering():
    text = DOC.read_text()
    committed = text[text.index(BEGIN):text.index(END) + len(END)]
    assert committed == method_table(), (
        "docs/methods.md's method table is stale: run "
        "`.venv/bin/python -m fl_merge.merging.method_table docs/methods.md`")


def test_every_method_file_has_its_rows():
    """One row per method, its aliases on it: the registered functions of fl_merge/methods/."""
    rows = [line for line in method_table().splitlines() if line.startswith("| `")]
    firsts = sorted(row.split(" | ")[0].removeprefix("| ") for row in rows)
    assert firsts == ["`breadcrumbs`", "`cclip`", "`dare`", "`fedavg`, `task_arithmetic`", "`fedgma`",
                      "`fednova`", "`fisher`", "`geometric_median`", "`hetero`", "`krum`", "`median`",
                      "`model_stock`", "`multikrum`", "`ties`", "`trimmed_mean`"]


def test_a_registered_method_renders_as_declared(monkeypatch):
    import fl_merge.merging.registry as reg

    monkeypatch.setattr(reg, "_METHODS", dict(reg._METHODS))
    import fl_merge.merging.method_table as table

    monkeypatch.setattr(table, "_METHODS", reg._METHODS)

    @reg.register("zz_demo", coordinatewise=False, needs=reg.Needs(normalisers=True),
                  space={"k": (1, 2)}, lambda_scale="delta", formula="a | b",
                  paper=reg.Paper("Someone 2021", code="someone/demo"))
    def zz_demo(task_vectors, weights, normalisers=None, k: int = 1, on: bool = True):
        return task_vectors[0]

    (row,) = [line for line in method_table().splitlines() if line.startswith("| `zz_demo`")]
    assert row == ("| `zz_demo` | a \\| b | k=1, on=true | k in 1, 2 | delta (eta = lambda) | "
                   "per-tensor variant | normalisers (else local steps) | Someone 2021; code: someone/demo |")


def test_the_page_needs_its_markers():
    with pytest.raises(ValueError, match="no method-table markers"):
        with_table("# no table here\n")
    assert with_table(f"a\n{BEGIN}\nold\n{END}\nb\n") == f"a\n{method_table()}\nb\n"
