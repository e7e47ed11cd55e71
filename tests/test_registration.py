"""The house's structure: packages by concern whose imports point one way (no circles, no
import that climbs back up), registries that find the built-ins in a fresh process without
anyone importing them, `import fl_merge.methods` free of Flower and Hydra, and code within
the Python floor flwr sets."""

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
INSTALLED = {"fl_merge_clients": "clients", "fl_merge_strategies": "strategies"}


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
        # the Flower glue imported under its installed names is the same folder (pyproject.toml)
        targets = {INSTALLED.get(t.partition(".")[0], t.partition(".")[0]) + "".join(t.partition(".")[1:])
                   for t in targets}
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


# The packages from the ground up: a module may import its own package and those on lower
# floors, never one above (docs/architecture.md draws this). data and deploy import nothing of ours.
FLOORS = {
    "fl_merge.core": 0, "fl_merge.deploy": 0, "fl_merge.data": 0, "fl_merge.merging": 1, "fl_merge.methods": 2,
    "fl_merge.models": 3, "fl_merge.tasks": 4, "fl_merge.io": 5, "fl_merge.stats": 6,
    "fl_merge.round": 7, "fl_merge.config": 8, "clients": 9, "strategies": 9,
    "fl_merge.engine": 10, "fl_merge.cli": 11, "fl_merge": 12,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "fl_merge" and len(parts) > 2 or (
        parts[0] == "fl_merge" and len(parts) == 2 and ".".join(parts) in FLOORS) else (
        "fl_merge" if parts[0] == "fl_merge" else parts[0])


def test_no_import_circles():
    graph = _module_graph()
    assert {"fl_merge.models.registry", "fl_merge.tasks.registry", "fl_merge.core.registration"} <= set(graph)
    # The registries import none of their registrants (they load them by name on first use).
    assert "fl_merge.models.hub" not in graph["fl_merge.models.registry"]
    assert "fl_merge.tasks.text" not in graph["fl_merge.tasks.registry"]
    assert graph["fl_merge.core.registration"] == set()
    assert _find_circle(graph) is None, " -> ".join(_find_circle(graph))


def test_packages_import_only_downwards():
    graph = _module_graph()
    assert {_package(m) for m in graph} == set(FLOORS), "a package without a floor"
    climbs = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if FLOORS[_package(b)] > FLOORS[_package(a)])
    assert climbs == [], "imports that climb back up: " + ", ".join(climbs)
    # The two sides of the Flower glue share a floor and never import each other.
    assert not [f"{a} -> {b}" for a, ts in graph.items() for b in ts
                if {_package(a), _package(b)} == {"clients", "strategies"}]
    # Floor 0 packages import nothing of ours.
    assert not [b for a, ts in graph.items() for b in ts if _package(a) in ("fl_merge.deploy", "fl_merge.data")]


def test_the_top_level_is_only_the_public_api():
    files = sorted(p.name for p in (ROOT / "fl_merge").glob("*.py"))
    assert files == ["__init__.py", "__main__.py"]


def test_merge_math_imports_neither_flower_nor_hydra():
    code = ("import sys, fl_merge.methods, fl_merge.merging.search, fl_merge.io.file_merge\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'hydra', 'ray', 'omegaconf'))\n"
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr


def test_lookups_load_the_builtins_once_in_a_fresh_process():
    code = """
import sys
from fl_merge.tasks.registry import check_tasks, load_task, suite_tasks
from fl_merge.models.registry import get_model_spec
from fl_merge.merging.registry import get_method
assert "fl_merge.tasks.text" not in sys.modules, "imported before any lookup"
print(suite_tasks("text")[0], suite_tasks("mnist8")[0], get_model_spec("minilm-l6").input_kind,
      get_model_spec("mnist-cnn").feature_dim, get_method("ties").name)
check_tasks(["digits8x8", "bbc-news"])
assert "fl_merge.tasks.text" in sys.modules and "fl_merge.methods.ties" in sys.modules
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


def test_every_package_is_installed_and_the_glue_under_names_that_say_whose():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    ours = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fl_merge").rglob("__init__.py")}
    assert set(setup["packages"]) == ours | {"fl_merge.configs", "fl_merge_clients", "fl_merge_strategies"}
    assert setup["package-dir"]["fl_merge_clients"] == "clients"
    assert setup["package-dir"]["fl_merge_strategies"] == "strategies"


def test_the_wheel_holds_no_plainly_named_clients_or_strategies(tmp_path):
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("fl_merge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fl_merge", "fl_merge_clients", "fl_merge_strategies"}
    assert "fl_merge_strategies/server_app.py" in names and "fl_merge_clients/client_app.py" in names
    assert "fl_merge/configs/config.yaml" in names and "fl_merge/methods/ties.py" in names
