"""The docs' method table is rendered from the registry, and the committed one is current."""

from __future__ import annotations

import ast
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


def _registered_in_files() -> list[str]:
    """The first cell of each method's row, from the register("name", aliases=(...)) calls
    written in fl_merge/methods/*.py (read as source, not through the registry)."""
    cells = []
    for path in sorted((DOC.parents[1] / "fl_merge" / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register":
                aliases = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "aliases"), ())
                cells.append(", ".join(f"`{n}`" for n in (ast.literal_eval(node.args[0]), *aliases)))
    return sorted(cells)


def test_every_method_file_has_its_rows():
    """One row per registered method, its aliases on it."""
    rows = [line for line in method_table().splitlines() if line.startswith("| `")]
    assert sorted(row.split(" | ")[0].removeprefix("| ") for row in rows) == _registered_in_files()
    assert len(_registered_in_files()) >= 15


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


def test_the_file_merge_column_says_what_fl_merge_merge_does():
    """'exact' in the table exactly where the file merge's scope (fl_merge/io/file_merge.py
    method_scope, at the defaults, given the method's per-model arrays) is exact: a method
    with a declared pass is exact on files too."""
    from fl_merge.io.file_merge import method_scope
    from fl_merge.merging.registry import available_methods, get_method

    cells = {row.split(" | ")[0].removeprefix("| ").split(",")[0].strip("`"): row.split(" | ")[5]
             for row in method_table().splitlines() if row.startswith("| `")}
    for name, cell in cells.items():
        m = get_method(name)
        if m.personal:
            continue
        scope = method_scope(name, dict(m.params), list(m.needs.extras))
        assert cell.startswith("exact") == (scope == "exact"), (name, cell, scope)
    assert cells["ties"].startswith("exact") and cells["pcb"].startswith("exact")
    assert cells["hetero"].startswith("exact")  # its Gram-matrix pass
    assert set(cells) <= set(available_methods())
