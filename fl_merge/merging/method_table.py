"""The docs' table of merge methods, rendered from the registry (what each method file
declares in its ``register(...)``), and kept between marker comments in docs/methods.md.

Regenerate it after adding or changing a method:

    .venv/bin/python -m fl_merge.merging.method_table docs/methods.md
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fl_merge.merging.method import Derived, MergeMethod
from fl_merge.merging.registry import _METHODS, available_methods, get_method

BEGIN = ("<!-- method-table: rendered from the registry by "
         "`python -m fl_merge.merging.method_table docs/methods.md`; do not edit by hand -->")
END = "<!-- /method-table -->"
COLUMNS = ("method", "Delta", "parameters (defaults)", "searched on validation", "lambda",
           "`fl-merge merge`", "clients send", "source")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def _cell(text: str) -> str:
    return (text or "–").replace("|", "\\|").replace("\n", " ")


def _declared(decl: Any, m: MergeMethod) -> tuple[Any, bool]:
    """(a declaration's value at the method's defaults, whether it depends on the parameters)."""
    return (decl(dict(m.params)), True) if callable(decl) else (decl, False)


def _row(m: MergeMethod) -> list[str]:
    names = ", ".join(f"`{n}`" for n in (m.name, *m.aliases))
    params = ", ".join(f"{k}={_value(v)}" for k, v in m.params.items())
    space = "; ".join(f"{k}: {g!r}" if isinstance(g, Derived) else f"{k} in {', '.join(map(_value, g))}"
                      for k, g in m.space.items())
    lam, varies = _declared(m.lambda_scale, m)
    scale = {"sum": "sum (eta = K lambda)", "delta": "delta (eta = lambda)"}.get(lam, str(lam))
    scale += " at the defaults, by parameters" if varies else ""
    exact, varies = _declared(m.per_tensor_exact, m)
    exact = ("exact" if exact else "per-tensor variant") + (
        " at the defaults, by parameters" if varies else "")
    if m.global_pass is not None:  # its pass over the whole update first (fl_merge/io/file_passes.py)
        exact = "exact (a declared pass over the files first)"
    if m.needs.extras:  # checkpoints do not carry them: files of them beside (fl_merge/io/file_merge.py)
        exact += " given --extras " + ", ".join(f"{n}=..." for n in m.needs.extras)
    if m.personal:
        exact = "refused (personal: one model per client)"
    source = m.paper.citation if m.paper else ""
    if m.paper and m.paper.code:
        source += f"; code: {m.paper.code}"
    return [names, m.formula or m.summary, params, space or "lambda only", scale, exact,
            m.needs.describe(), source]


def method_table() -> str:
    """The markdown table of every registered method (aliases on their method's row), in
    name order, with the markers around it."""
    rows = [_row(get_method(n)) for n in available_methods() if n not in _METHODS[n].aliases]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join([BEGIN, *lines, END])


def with_table(text: str) -> str:
    """`text` (a markdown page holding the markers) with the table between them replaced by
    the current rendering; ValueError when the markers are missing."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the page has no method-table markers ({BEGIN!r} ... {END!r})")
    head, rest = text.split(BEGIN, 1)
    return head + method_table() + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fl_merge.merging.method_table docs/methods.md", file=sys.stderr)
        return 2
    path = Path(args[0])
    path.write_text(with_table(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
