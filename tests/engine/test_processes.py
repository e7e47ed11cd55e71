"""Stopping a run's children: the whole tree goes, also a grandchild that left the group."""

import subprocess
import sys
import time

import psutil

from fl_merge.deploy.processes import process_tree, stop_group

# A child that starts a grandchild in a NEW session (out of the child's process group, as a
# daemon would), prints the grandchild's pid, then sleeps.
CHILD = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print(g.pid, flush=True)
time.sleep(300)
"""


def test_stop_group_stops_a_grandchild_that_left_the_group():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        grandchild = int(child.stdout.readline())
        assert {p.pid for p in process_tree(child.pid)} == {child.pid, grandchild}
        stop_group(child.pid, grace=2.0, wait=lambda t: child.wait(timeout=t))
        deadline = time.monotonic() + 10
        while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the grandchild outside the group survived"
            time.sleep(0.05)
        assert child.poll() is not None
    finally:
        for pid in (child.pid,):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


def test_process_tree_of_a_finished_process_is_empty():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert process_tree(p.pid) == []


# --------------------------------------------------------------- orphans and tags
import os  # noqa: E402
import signal  # noqa: E402

import pytest  # noqa: E402

from fl_merge.deploy.processes import (  # noqa: E402
    ORPHAN_EXIT,
    TAG_VAR,
    exit_text,
    has_tag,
    orphan_check,
    tagged_processes,
)


def test_orphan_check_gives_up_grace_seconds_after_the_parent_changed():
    assert orphan_check(100, 100, None, 50.0, 10.0) == (None, False)  # same parent: wait on
    assert orphan_check(100, 1, None, 50.0, 10.0) == (50.0, False)  # just re-parented
    assert orphan_check(100, 1, 50.0, 59.9, 10.0) == (50.0, False)
    assert orphan_check(100, 1, 50.0, 60.0, 10.0) == (50.0, True)  # 10 s later
    assert orphan_check(100, 777, 50.0, 75.0, 10.0) == (50.0, True)  # re-parented to a subreaper


@pytest.mark.parametrize("code, text", [(-9, "killed by SIGKILL"), (-15, "killed by SIGTERM"),
                                        (0, "exited with code 0"), (1, "exited with code 1")])
def test_exit_text(code, text):
    assert exit_text(code) == text


def test_has_tag():
    assert has_tag({TAG_VAR: "abc"}, "abc")
    assert not has_tag({TAG_VAR: "abc"}, "abd")
    assert not has_tag({}, "abc")
    assert not has_tag({TAG_VAR: ""}, "")  # an empty tag matches nothing


# A parent that starts a watched child and prints its pid, then sleeps until it is killed.
# The child runs watch_parent (then says so in <file>.armed): when the parent dies it
# writes <file> and exits ORPHAN_EXIT.
WATCHED = """
import sys, time
from fl_merge.deploy.processes import watch_parent
watch_parent(lambda: open(sys.argv[1], "w").write("orphaned"), grace=1.0, poll=0.1)
open(sys.argv[1] + ".armed", "w").close()
time.sleep(120)
"""
PARENT = """
import subprocess, sys, time
c = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(c.pid, flush=True)
time.sleep(120)
"""


def test_watch_parent_ends_an_orphan_and_tags_find_it(tmp_path):
    """A real orphan: its parent is SIGKILLed, the child (found by its inherited tag, not
    through the dead parent's tree) records why and exits by itself ~grace seconds later."""
    from fl_merge.deploy.processes import ROOT, new_tag

    tag, marker = new_tag(), tmp_path / "why"
    env = {**os.environ, TAG_VAR: tag, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WATCHED, str(marker)], env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        deadline = time.monotonic() + 120
        while not (tmp_path / "why.armed").exists():  # its imports take seconds under load
            assert time.monotonic() < deadline and child.is_running(), "the child never armed its watch"
            time.sleep(0.1)
        # Asked only once the child runs Python: right after its exec the kernel may show an
        # empty /proc/<pid>/environ (the vfork parent resumes before exec sets it up).
        assert {p.pid for p in tagged_processes(tag)} == {parent.pid, child.pid}
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert child.pid in {p.pid for p in tagged_processes(tag)}  # re-parented, still found
        assert child.ppid() != parent.pid
        deadline = time.monotonic() + 30
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the orphan did not end itself"
            time.sleep(0.1)
        assert marker.read_text() == "orphaned"
        assert tagged_processes(tag) == []
    finally:
        for p in tagged_processes(tag):
            p.kill()
    assert ORPHAN_EXIT != 0
