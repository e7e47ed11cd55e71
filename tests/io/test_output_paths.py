"""Output paths checked before anything starts (fl_merge/io/output_paths.py)."""

from __future__ import annotations

import os

import pytest

from fl_merge.io.output_paths import unwritable_reason


def test_a_folder_that_exists_or_can_be_made_is_writable_and_the_check_creates_nothing(tmp_path):
    assert unwritable_reason(tmp_path) is None
    assert unwritable_reason(tmp_path / "a" / "b") is None
    assert unwritable_reason(tmp_path / "a" / "m.safetensors", as_file=True) is None
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    assert unwritable_reason(tmp_path / "f") == f"{tmp_path / 'f'} is a file, not a folder"
    assert unwritable_reason(tmp_path / "f" / "run" / "deeper") == f"{tmp_path / 'f'} is a file, not a folder"
    assert unwritable_reason(tmp_path / "f" / "m.safetensors", as_file=True) == \
        f"{tmp_path / 'f'} is a file, not a folder"
    assert unwritable_reason(tmp_path, as_file=True) == f"{tmp_path} is a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_folder_without_write_permission_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert unwritable_reason(locked / "run") == f"cannot create files in {locked} (Permission denied)"
    finally:
        locked.chmod(0o700)


def test_a_read_only_system_folder_is_named():
    """/proc refuses new files even to root (a permission bit alone would not tell)."""
    why = unwritable_reason("/proc/fl-merge-run")
    assert why is not None and why.startswith("cannot create files in /proc (")
