"""`fl-merge-supernode --heartbeat-interval`: the interval is checked against what Flower's
SuperLink accepts before anything starts, and, once set, Flower's own SuperNode code (its
fleet connection, against a stand-in SuperLink, and its heartbeat sender) announces it and
paces its heartbeats by it. These fail if flwr renames or stops reading what
fl_merge.deploy.launchers sets. The real deployment runs it in test_process_faults.py and
test_multihost.py."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading

import pytest
from flwr.common.constant import HEARTBEAT_CALL_TIMEOUT, HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL
from flwr.proto.fleet_pb2 import ActivateNodeResponse  # pylint: disable=E0611
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatResponse  # pylint: disable=E0611

from fl_merge.deploy import launchers
from fl_merge.deploy.launchers import check_heartbeat_interval, lost_after, set_heartbeat_interval


def test_intervals_flower_accepts_pass_and_others_are_named():
    assert check_heartbeat_interval(HEARTBEAT_MIN_INTERVAL) == 10.0
    assert check_heartbeat_interval(HEARTBEAT_MAX_INTERVAL) == 1800.0
    assert check_heartbeat_interval(12.5) == 12.5
    for bad in (9.99, 0, -10, 1801, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^--heartbeat-interval must be 10\.\.1800 seconds .* got "):
            check_heartbeat_interval(bad)


def test_a_node_is_declared_lost_two_intervals_after_its_last_heartbeat():
    assert lost_after(10) == 20  # flwr's HEARTBEAT_PATIENCE = 2
    assert lost_after(30) == 60


@pytest.fixture
def restored(monkeypatch):
    """Whatever a test sets in flwr's modules is put back afterwards."""
    import importlib

    for name in launchers.HEARTBEAT_MODULES:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, launchers.HEARTBEAT_NAME, getattr(module, launchers.HEARTBEAT_NAME))


class _StandInSuperLink:
    """What flwr's SuperNode fleet connection calls on its HTTP client; records the
    interval it announces (at activation and in each heartbeat)."""

    announced: list[tuple[str, float]] = []
    beat = threading.Event()

    @classmethod
    @contextlib.contextmanager
    def from_server_address(cls, *args, **kwargs):
        yield cls()

    def RegisterNode(self, request):
        return None

    def ActivateNode(self, request):
        self.announced.append(("activate", request.heartbeat_interval))
        return ActivateNodeResponse(node_id=7)

    def SendNodeHeartbeat(self, request):
        self.announced.append(("heartbeat", request.heartbeat_interval))
        self.beat.set()
        return SendNodeHeartbeatResponse(success=True)

    def DeactivateNode(self, request):
        return None

    def UnregisterNode(self, request):
        return None


def test_the_supernode_announces_the_interval_set(restored, monkeypatch):
    from flwr.supernode import fleet_http_connection

    monkeypatch.setattr(fleet_http_connection, "FleetHttpClient", _StandInSuperLink)
    set_heartbeat_interval(12)
    with fleet_http_connection.http_request_response("127.0.0.1:9092", insecure=True) as (node_id, *_):
        assert _StandInSuperLink.beat.wait(timeout=60), "no heartbeat sent"
    assert node_id == 7
    assert _StandInSuperLink.announced[:2] == [("activate", 12.0), ("heartbeat", 12.0)]


def test_the_heartbeat_sender_waits_by_the_interval_set(restored):
    """flwr waits (interval - call timeout) x (0.8 +- 0.1) between heartbeats."""
    from flwr.supercore.heartbeat import HeartbeatSender

    class StopAfterOneWait:
        def __init__(self):
            self.waited: list[float] = []

        def is_set(self):
            return bool(self.waited)

        def wait(self, seconds):
            self.waited.append(seconds)

    set_heartbeat_interval(20)
    sender = HeartbeatSender(lambda: True)
    sender._stop_event = StopAfterOneWait()
    sender._run()  # one heartbeat, one wait, then stopped (in this thread)
    (waited,) = sender._stop_event.waited
    assert (20 - HEARTBEAT_CALL_TIMEOUT) * 0.7 <= waited <= (20 - HEARTBEAT_CALL_TIMEOUT) * 0.9


def test_a_bad_interval_is_one_line_before_flower_starts():
    for value, why in (("5", "must be 10..1800 seconds"), ("abc", "invalid float value: 'abc'")):
        proc = subprocess.run([sys.executable, "-m", "fl_merge.deploy.launchers", "supernode", "--heartbeat-interval", value,
                               "--insecure", "--superlink", "127.0.0.1:9"], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("fl-merge-supernode: error: ") and why in last, proc.stderr
        assert "Flower SuperNode" not in proc.stdout + proc.stderr  # nothing started


def test_the_launchers_load_no_torch():
    """A SuperNode or SuperLink needs none of fl-merge's torch side: fl-merge-supernode and
    fl-merge-superlink stay as small as Flower's own (their ClientApps / ServerApp,
    processes of their own, load what they need)."""
    code = "import sys, fl_merge.deploy.launchers; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"
