"""benchmarks/deployment_large.py's bookkeeping: which Flower process a command line is, and
the per-phase peaks of its samples (checked against peaks worked out by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "deployment_large", Path(__file__).resolve().parents[1] / "benchmarks" / "deployment_large.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_roles_from_command_lines():
    assert bench.role_of(["/v/bin/python", "/v/bin/flwr-serverapp", "--insecure"]) == "serverapp"
    assert bench.role_of(["/v/bin/python", "/v/bin/flwr-clientapp", "--token", "x"]) == "clientapp"
    assert bench.role_of(["/v/bin/python", "/v/bin/flower-superexec", "--plugin-type", "serverapp"]) == "superexec"
    assert bench.role_of(["/v/bin/python", "/v/bin/flower-superlink", "--insecure"]) == "superlink"
    assert bench.role_of(["/v/bin/python", "/v/bin/flower-supernode", "--insecure"]) == "supernode"
    assert bench.role_of(["sleep", "1"]) == "other"


def test_phase_peaks_by_hand():
    marks = [(10.0, "train"), (20.0, "aggregate")]
    assert [bench.phase_at(t, marks) for t in (5, 10, 15, 20, 99)] == [
        "start", "train", "train", "aggregate", "aggregate"]
    samples = [  # (time, group, role, rss, anon)
        (5, "superlink", "superlink", 100, 90), (5, "superlink", "serverapp", 50, 40),
        (12, "superlink", "superlink", 300, 250), (12, "superlink", "serverapp", 400, 100),
        (15, "superlink", "superlink", 200, 200), (15, "superlink", "serverapp", 600, 500),
        (25, "superlink", "superlink", 150, 100), (25, "node", "supernode", 70, 60),
    ]
    peaks = bench.phase_peaks(samples, marks)
    assert peaks["start"]["superlink/total"] == (150, 130)
    assert peaks["train"]["superlink/serverapp"] == (600, 500)
    assert peaks["train"]["superlink/superlink"] == (300, 250)
    # the total is the peak of same-time sums (800 at t=15), not the sum of the peaks (900)
    assert peaks["train"]["superlink/total"] == (800, 700)
    assert peaks["aggregate"] == {"superlink/superlink": (150, 100), "node/supernode": (70, 60),
                                  "superlink/total": (150, 100), "node/total": (70, 60)}
    assert peaks["whole run"]["superlink/total"] == (800, 700)


def test_phase_markers_become_wall_times_from_the_least_delayed_line():
    # (read at, phase, seconds into the round): the round began at wall time 1000; lines are
    # read 0.5 s, 0.2 s and 3 s after they were logged (Flower streams the logs in batches)
    seen = [(1000.5, "train", 0.0), (1010.2, "aggregate", 10.0), (1023.0, "validation", 20.0)]
    assert bench.wall_marks(seen) == [(1000.2, "train"), (1010.2, "aggregate"), (1020.2, "validation")]
    assert bench.wall_marks([]) == []
    assert [bench.phase_at(t, bench.wall_marks(seen)) for t in (999, 1005, 1019, 1021)] == [
        "start", "train", "aggregate", "validation"]
