"""Stopping a run's children: the whole tree goes, also a grandchild that left the group."""

import subprocess
import sys
import time

import psutil

from fl_merge.processes import process_tree, stop_group

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
