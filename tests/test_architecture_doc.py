"""docs/architecture.md stays true to the code: its table names every package the import
rule knows (tests/test_registration.py FLOORS) on that floor, its picture's script reads the
same package imports as that test, and every doc a docstring, comment or page names exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from test_registration import FLOORS, _module_graph, _package

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"


def _table() -> dict[str, int]:
    """package (as FLOORS names it) -> floor, from the page's table rows."""
    rows = {}
    for floor, cell in re.findall(r"^\| (\d+) \| `([^`]+)`", PAGE.read_text(), re.M):
        name = cell.rstrip("/").removesuffix("/__init__.py").removesuffix(".py").replace("/", ".")
        rows[name] = int(floor)
    return rows


def test_the_table_has_every_package_on_its_floor():
    assert _table() == FLOORS


def test_the_pictures_script_reads_the_imports_the_rule_checks():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs" / "import_graph.py")
    drawing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drawing)
    edges, _ = drawing.read_packages()
    expected: dict[str, set[str]] = {}
    for a, targets in _module_graph().items():
        for b in targets:
            if _package(a) != _package(b):
                expected.setdefault(_package(a), set()).add(_package(b))
    assert {a: ts for a, ts in edges.items() if ts} == expected
    # every arrow points down the declared floors too
    assert all(FLOORS[b] < FLOORS[a] for a, ts in edges.items() for b in ts)


def test_every_named_doc_exists():
    """A `NAME.md` or `docs/NAME.md` in code, configs or docs is a file of the repository
    (no pointer to a page that does not exist, such as a DESIGN.md)."""
    name = re.compile(r"(?<![\w/.\-])((?:docs/)?[\w\-]+\.md)\b")
    sources = [p for d in ("fl_merge", "clients", "strategies", "configs") for p in (ROOT / d).rglob("*")
               if p.suffix in (".py", ".yaml")]
    sources += [ROOT / "README.md", ROOT / "pyproject.toml", *(ROOT / "docs").glob("*.md")]
    missing = sorted({f"{p.relative_to(ROOT)}: {m}" for p in sources for m in name.findall(p.read_text())
                      if not any((d / m).exists() for d in (ROOT, p.parent, ROOT / "docs"))})
    assert missing == []
