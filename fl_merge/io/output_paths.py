"""Can a run or a merge write where it was told to? Checked before anything starts, so an
unwritable `output-dir` or `fl-merge merge --out` is one line instead of a traceback after
the SuperLink started (and nothing is created by the check: no folder, no file).
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def unwritable_reason(path: str | Path, as_file: bool = False) -> str | None:
    """Why `path` cannot be written, in a few words, or None when it can: a folder to create
    or fill (`as_file`: a file to create or replace). Walks up to the nearest existing
    folder, which must be a folder and accept a new file (tried with a temporary file that is
    removed at once: a permission bit alone does not tell root or a read-only mount)."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not as_file and not target.is_dir():
        return f"{target} is a file, not a folder"
    if as_file and target.is_dir():
        return f"{target} is a folder"
    start = target.parent if as_file else target
    existing = next(p for p in (start, *start.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot create files in {existing} ({e.strerror or type(e).__name__})"
    return None
