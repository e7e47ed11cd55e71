"""`fl-merge-superlink --sqlite-busy-timeout`: the timeout is checked before anything starts,
and, once set, Flower's own SQL state (its object store, opened the way the SuperLink opens
it with --database FILE) waits that long for sqlite's write lock, with Flower's other pragmas
kept. Fails if flwr renames or stops reading what fl_merge.deploy.launchers sets. The full
recipe with a large model runs in benchmarks/sqlite_state.py (docs/deployment.md)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from fl_merge.deploy import launchers
from fl_merge.deploy.launchers import check_busy_timeout, pragmas_with_busy_timeout, set_busy_timeout


def test_positive_timeouts_pass_and_others_are_named():
    assert check_busy_timeout(60) == 60.0
    assert check_busy_timeout(0.5) == 0.5
    for bad in (0, -1, float("nan"), float("inf"), 3e6):
        with pytest.raises(ValueError, match=r"^--sqlite-busy-timeout must be a positive number of seconds"):
            check_busy_timeout(bad)


def test_only_the_busy_timeout_changes_and_it_comes_first():
    flowers = (("busy_timeout", "5000"), ("journal_mode", "WAL"), ("synchronous", "NORMAL"))
    assert pragmas_with_busy_timeout(flowers, 60) == (
        ("busy_timeout", "60000"), ("journal_mode", "WAL"), ("synchronous", "NORMAL"))
    assert pragmas_with_busy_timeout((("journal_mode", "WAL"),), 1.5) == (
        ("busy_timeout", "1500"), ("journal_mode", "WAL"))


def test_flowers_sql_store_waits_as_long_as_set(tmp_path, monkeypatch):
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore

    module = importlib.import_module(launchers.PRAGMAS_MODULE)
    monkeypatch.setattr(module, launchers.PRAGMAS_NAME, getattr(module, launchers.PRAGMAS_NAME))

    def opened(name: str) -> SqlObjectStore:
        store = SqlObjectStore(str(tmp_path / name))  # what `--database FILE` opens
        store.initialize()
        return store

    assert opened("before.db").query("PRAGMA busy_timeout") == [{"timeout": 5000}]  # flwr 1.41's
    set_busy_timeout(60)
    store = opened("after.db")
    assert store.query("PRAGMA busy_timeout") == [{"timeout": 60000}]
    assert store.query("PRAGMA journal_mode") == [{"journal_mode": "wal"}]  # Flower's others kept


def test_a_bad_timeout_is_one_line_before_flower_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fl_merge.deploy.launchers", "superlink", "--sqlite-busy-timeout", "0",
                           "--insecure", "--database", str(tmp_path / "state.db")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "fl-merge-superlink: error: --sqlite-busy-timeout must be a positive number of seconds (e.g. 60), got 0")
    assert not (tmp_path / "state.db").exists()  # nothing started
