"""Atomic file writing: a file is the old content or the new one, whole, never half-written.

`atomic_write` fills a temporary file in the target's directory, flushes it to disk (fsync),
then renames it over the target (and fsyncs the directory entry). A run interrupted at any
point (Ctrl-C, SIGKILL, a crash) leaves the old file or the new one. Temporary files are
hidden (``.<name>.tmp-<host>-<pid>-<random>``), so nothing that reads results or cache
entries ever picks one up; one left behind by a killed writer is removed by the next write
to the same directory.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A temp file of another host (shared directory) is only presumed dead after this long.
STALE_TEMP_SECONDS = 3600.0
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
# ".<name>.tmp-<host>-<pid>-<hex>"; also the older ".<name>.tmp<pid>" some writers use.
_TEMP_RE = re.compile(r"^\..+\.tmp(?:-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]+|(?P<old>\d+))$")


def temp_path(path: Path) -> Path:
    """A fresh hidden temporary name next to `path` (unique per host, process and call)."""
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp(name: str) -> bool:
    """Whether a file name is one of our (or an older writer's) temporary files."""
    return _TEMP_RE.match(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temporary files in `directory` left by writers that died mid-write: those of
    a dead process on this host, and any older than STALE_TEMP_SECONDS. A temporary folder
    (a folder output staged whole, fl_merge/io/merge_output.py) only when its process on this
    host is dead: its own mtime does not move while a long write fills it. Returns them."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None:
            continue
        pid = int(m["pid"] or m["old"])
        ours = m["old"] is not None or m["host"] == _HOST
        try:
            if entry.is_dir(follow_symlinks=False):
                if ours and m["pid"] and not _pid_alive(pid):
                    shutil.rmtree(entry.path)
                    removed.append(Path(entry.path))
                continue
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
            if old or (ours and not _pid_alive(pid)):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone already (another cleaner), or not ours to remove
            continue
    return removed


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # a platform that cannot open directories: nothing to sync
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def sync_directory(directory: str | os.PathLike) -> None:
    """fsync a directory, so that renames into it survive a crash (no-op where a platform
    cannot open directories)."""
    _fsync(Path(directory), directory=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write `path` atomically: `write(tmp)` fills a temporary file in the same directory,
    which is fsync'd and renamed over `path`; then the directory is fsync'd, so after a
    crash `path` is the old content or the new one, whole. Stale temporary files of dead
    writers in that directory are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_path(path)
    try:
        write(tmp)
        _fsync(tmp)  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_directory(path.parent)  # the rename itself survives a crash
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8, newlines as given)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)
