"""Which parameters are merged: fnmatch-style name patterns (run-config `merge-keys`).

A parameter is merged (part of every task vector, averaged by the method) when its name
matches any pattern; every other parameter is per-task (a client's own head, never merged,
sent back to that client only). The default ``backbone.*`` is the rule of fl-merge's own
models (``TaskModel``: ``backbone.`` shared, ``head.`` per task). Patterns use
`fnmatch.fnmatchcase`: ``*`` matches any run of characters, dots included, and case counts.

The ServerApp checks the patterns against theta0 right after loading it, before any client
trains: patterns matching none of theta0's parameters are one error naming the patterns and
some of theta0's keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase

from fl_merge.core.task_vectors import one_line

DEFAULT_MERGE_KEYS: tuple[str, ...] = ("backbone.*",)


class MergeKeysError(ValueError):
    """merge-keys that are empty or select nothing of theta0 (one line)."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(one_line(message), *args)


def parse_merge_keys(text: str | Sequence[str]) -> tuple[str, ...]:
    """'backbone.*, enc.*' (commas or spaces) or a list -> ('backbone.*', 'enc.*')."""
    items = text.replace(",", " ").split() if isinstance(text, str) else [str(t).strip() for t in text]
    patterns = tuple(p for p in items if p)
    if not patterns:
        raise MergeKeysError("merge-keys is empty: give name patterns of the parameters to merge, "
                             "e.g. 'backbone.*'")
    return patterns


def key_matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """is_merged(name): True when `name` matches any of `patterns`."""
    pats = tuple(patterns)

    def is_merged(name: str) -> bool:
        return any(fnmatchcase(name, p) for p in pats)

    return is_merged


def check_merge_keys(keys: Iterable[str], patterns: Sequence[str], shown: int = 5) -> list[str]:
    """The keys the patterns select; MergeKeysError naming the patterns and `shown` of the
    keys when they select none."""
    keys = list(keys)
    is_merged = key_matcher(patterns)
    merged = [k for k in keys if is_merged(k)]
    if not merged:
        seen = ", ".join(keys[:shown]) + (f", ... ({len(keys)} in all)" if len(keys) > shown else "")
        raise MergeKeysError(
            f"merge-keys {list(patterns)} match none of the base model's parameters "
            f"({seen or 'it has none'}): set merge-keys to patterns of the shared parameters, "
            f"e.g. '{_suggest(keys)}'")
    return merged


def _suggest(keys: list[str]) -> str:
    """A pattern for the first key's top-level module ('enc.w' -> 'enc.*')."""
    if not keys:
        return "backbone.*"
    head, dot, _ = keys[0].partition(".")
    return f"{head}.*" if dot else keys[0]
