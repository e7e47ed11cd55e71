"""Explicit registration: no import circles among the project's modules, the registries find
the built-ins in a fresh process without anyone importing fl_merge.builtins, and the code
stays within the Python floor flwr sets."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fl_merge", "strategies", "clients")


def _module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (any import statement, also inside functions;
    an import of a package's own parent package is not an edge: that is how submodules load)."""
    files = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name and not name.startswith(t + ".")}
    return graph


def _find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        path.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_circle_finder_sees_a_circle_and_a_clean_graph():
    assert _find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles():
    graph = _module_graph()
    assert {"fl_merge.models", "clients.tasks", "fl_merge.builtins"} <= set(graph)
    # The registries import none of their registrants; the builtins module imports them all.
    assert "fl_merge.hub" not in graph["fl_merge.models"]
    assert "clients.text_tasks" not in graph["clients.tasks"]
    assert {"clients.image_tasks", "clients.text_tasks", "fl_merge.hub",
            "fl_merge.backbones"} <= graph["fl_merge.builtins"]
    assert _find_circle(graph) is None, " -> ".join(_find_circle(graph))


def test_lookups_load_the_builtins_once_in_a_fresh_process():
    code = """
import sys
from clients.tasks import check_tasks, load_task, suite_tasks
from fl_merge.models import get_model_spec
from fl_merge.aggregation.registry import get_method
assert "fl_merge.builtins" not in sys.modules, "imported before any lookup"
print(suite_tasks("text")[0], suite_tasks("mnist8")[0], get_model_spec("minilm-l6").input_kind,
      get_model_spec("mnist-cnn").feature_dim, get_method("ties").name)
check_tasks(["digits8x8", "bbc-news"])
assert "fl_merge.builtins" in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bbc-news", "rotate90", "text", "128", "ties"]


def _floor(spec: str) -> tuple[int, int]:
    m = re.search(r">=\s*(\d+)\.(\d+)", spec)
    assert m, f"no lower bound in {spec!r}"
    return int(m[1]), int(m[2])


def test_python_floor_is_flwrs_and_the_code_parses_at_that_floor():
    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    flwr = importlib.metadata.metadata("flwr")["Requires-Python"]
    assert _floor(ours) == _floor(flwr), f"requires-python {ours}, flwr needs {flwr}"
    floor = _floor(ours)
    for pkg in (*PACKAGES, "tests", "experiments", "benchmarks"):
        for path in (ROOT / pkg).rglob("*.py"):
            ast.parse(path.read_text(), filename=str(path), feature_version=floor)
