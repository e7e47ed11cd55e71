"""The round's phase markers: one log line as each phase starts (train, aggregate,
validation, test, write), saying how far into the round it starts and how long the phase
before it took, in seconds: not a raw epoch timestamp. benchmarks/deployment_large.py reads
them (`PHASE_PATTERN`) to split its memory samples by phase.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

# "fl-merge phase <name> starts <seconds> s into the round"; the benchmark's parser
PHASE_PATTERN = re.compile(r"fl-merge phase (\S+) starts ([0-9.]+) s into the round")


def phase_line(name: str, elapsed: float, previous: tuple[str, float] | None) -> str:
    """'fl-merge phase validation starts 12.3 s into the round (aggregate took 1.1 s)':
    `elapsed` seconds since the round started; `previous`: the phase before and its seconds."""
    line = f"fl-merge phase {name} starts {elapsed:.1f} s into the round"
    return line + (f" ({previous[0]} took {previous[1]:.1f} s)" if previous else "")


@dataclass
class PhaseClock:
    """The round's clock (a monotonic one: perf_counter): `mark` a phase's start, get its line."""

    started: float = field(default_factory=time.perf_counter)
    current: tuple[str, float] | None = None  # the phase running and when it started

    def mark(self, name: str, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        previous = None if self.current is None else (self.current[0], now - self.current[1])
        self.current = (name, now)
        return phase_line(name, now - self.started, previous)
