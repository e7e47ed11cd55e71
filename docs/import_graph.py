"""Draw docs/architecture.png: fl-merge's packages and the imports between them, read from the
code (every import statement of fl_merge/, clients/ and strategies/, also those inside
functions), nothing run.

A box is a package (its .py lines in the corner); a package stands one floor above the
highest package it imports, so every arrow points down. An arrow A -> B says that some module
of A imports one of B; an arrow that a longer way down already implies is left out, so the
picture keeps only the floors' direct links. tests/test_registration.py holds the same rule
as a test (FLOORS).

    .venv/bin/python docs/import_graph.py [--out docs/architecture.png]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("fl_merge", "clients", "strategies")
INSTALLED = {"fl_merge_clients": "clients", "fl_merge_strategies": "strategies"}  # pyproject.toml


def package_of(module: str) -> str:
    """fl_merge.io.results -> fl_merge.io; fl_merge (its __init__, __main__) -> fl_merge;
    clients.training -> clients."""
    parts = module.split(".")
    if parts[0] != "fl_merge":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 2 or (ROOT / "fl_merge" / parts[-1]).is_dir() else "fl_merge"


def read_packages() -> tuple[dict[str, set[str]], dict[str, int]]:
    """(package -> the packages it imports, package -> lines of its .py files)."""
    files = {}
    for top in ROOTS:
        for path in (ROOT / top).rglob("*.py"):
            files[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    edges: dict[str, set[str]] = {}
    lines: dict[str, int] = {}
    for name, path in files.items():
        own = package_of(name)
        lines[own] = lines.get(own, 0) + len(path.read_text().splitlines())
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                top, dot, rest = target.partition(".")
                target = INSTALLED.get(top, top) + dot + rest
                # a module of ours, not this one, and not its own parent package (how submodules load)
                if target in files and target != name and not name.startswith(target + "."):
                    if package_of(target) != own:
                        edges.setdefault(own, set()).add(package_of(target))
    for pkg in lines:
        edges.setdefault(pkg, set())
    return edges, lines


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """0 for a package that imports none of ours, else one above the highest it imports."""
    out: dict[str, int] = {}

    def floor(p: str, path: tuple[str, ...] = ()) -> int:
        if p in path:
            raise ValueError(f"import circle: {' -> '.join(path + (p,))}")
        if p not in out:
            out[p] = 1 + max((floor(q, path + (p,)) for q in edges[p]), default=-1)
        return out[p]

    for p in edges:
        floor(p)
    return out


def direct(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The arrows no longer way down implies (the transitive reduction of a DAG)."""
    def reach(p: str) -> set[str]:
        seen, todo = set(), list(edges[p])
        while todo:
            q = todo.pop()
            if q not in seen:
                seen.add(q)
                todo.extend(edges[q])
        return seen

    return {(a, b) for a, ts in edges.items() for b in ts
            if not any(b in reach(c) for c in ts if c != b)}


def draw(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, lines = read_packages()
    level = floors(edges)
    arrows = direct(edges)
    rows: dict[int, list[str]] = {}
    for p in edges:
        rows.setdefault(level[p], []).append(p)
    top = max(rows)
    fig, ax = plt.subplots(figsize=(11, 1.05 * (top + 1) + 0.8))
    width, height, pos = 1.7, 0.5, {}
    for f in sorted(rows, reverse=True):  # from the top: each row ordered under its importers
        def key(p: str) -> tuple[float, int, str]:
            above = [a for a, b in arrows if b == p]
            mean_x = sum(pos[a][0] for a in above) / len(above) if above else 5.0
            return (mean_x, -max((level[a] - f for a in above), default=0), p)  # long arrows outside

        names = sorted(rows[f], key=key)
        for i, p in enumerate(names):
            n = len(names)
            x = 5.0 if n == 1 else (2.5 + 5.0 * i if n == 2 else 0.7 + 8.6 * i / (n - 1))
            pos[p] = (x, float(f))
    for a, b in sorted(arrows):
        (xa, ya), (xb, yb) = pos[a], pos[b]
        start = (xa, ya - height / 2)
        if level[a] - level[b] > 1 and abs(xa - xb) > 0.5:  # leave by the side, past the floors between
            start = (xa + (width / 2 if xb > xa else -width / 2), ya)
        ax.annotate("", xy=(xb, yb + height / 2), xytext=start,
                    arrowprops={"arrowstyle": "-|>", "color": "0.55", "lw": 0.9, "shrinkA": 0, "shrinkB": 0})
    glue = {"clients": "#f3e6c8", "strategies": "#f1d5dc"}
    for p, (x, y) in pos.items():
        label = {"clients": "clients/\n(fl_merge_clients)",
                 "strategies": "strategies/\n(fl_merge_strategies)",
                 "fl_merge": "fl_merge\n(public API)"}.get(p, p.replace("fl_merge.", "") + "/")
        ax.add_patch(plt.Rectangle((x - width / 2, y - height / 2), width, height, lw=1.0,
                                   ec="0.3", fc=glue.get(p, "#d6e4f0")))
        ax.text(x, y, label, ha="center", va="center", fontsize=9)
        ax.text(x + width / 2 - 0.05, y + height / 2 - 0.05, f"{lines[p]}", ha="right", va="top",
                fontsize=6, color="0.35")
    for f in rows:
        ax.text(-0.35, f, f"floor {f}", ha="right", va="center", fontsize=8, color="0.4")
    ax.set_xlim(-1.3, 10.2)
    ax.set_ylim(-0.6, top + 0.6)
    ax.axis("off")
    ax.set_title("fl-merge: packages and their imports (an arrow A -> B: A imports B; "
                 "implied arrows left out)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "architecture.png")
    print(draw(parser.parse_args().out))


if __name__ == "__main__":
    main()
