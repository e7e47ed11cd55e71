"""The one parser of a value written as text, for every place fl-merge reads one: method
parameters (``ties.density=0.3``, `fl_merge.config.parsing`), ``fl-merge merge --param``,
``fl-merge-run --run-config`` items and the cells of a results CSV (`fl_merge.io.results`);
and the one splitter of a list written as text (`split_list`: method names, tasks, etas,
lambdas); `did_you_mean`, the hint for a mistyped key.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


def parse_value(text: str) -> Any:
    """A value as its text says: 'true'/'false' (any case) -> bool, an integer -> int, any
    other number Python reads (0.5, 1e-3, nan, inf) -> float, anything else -> the text as
    given (so ``ties``, ``0.1..0.3`` and the empty string stay text)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def split_list(text: str) -> list[str]:
    """The items of a list written as text, separated by commas and/or spaces, empty ones
    left out: 'a, b c' -> ['a', 'b', 'c']."""
    return [t for t in (s.strip() for s in str(text).replace(" ", ",").split(",")) if t]


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """The tail of an error line naming an unknown key: " (did you mean 'x'?)" with the
    closest of `known` to the mistyped `word` (difflib's similarity ratio at least 0.8: a
    letter or two off), "" when none is that close."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.8)
    return f" (did you mean '{close[0]}'?)" if close else ""
