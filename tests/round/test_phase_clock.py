"""The round's phase lines say how far into the round a phase starts and how long the one
before took (seconds, not a raw epoch timestamp), and the memory benchmark reads them back."""

from __future__ import annotations

from fl_merge.round.clock import PHASE_PATTERN, PhaseClock, phase_line


def test_phase_lines_are_elapsed_seconds_and_the_previous_phase():
    clock = PhaseClock(started=100.0)
    first = clock.mark("train", now=100.25)
    assert first == "fl-merge phase train starts 0.2 s into the round"
    second = clock.mark("aggregate", now=112.5)
    assert second == "fl-merge phase aggregate starts 12.5 s into the round (train took 12.2 s)"
    assert clock.mark("validation", now=115.0).endswith("(aggregate took 2.5 s)")
    # an epoch timestamp would be ~1.7e9: these are seconds since the round began
    assert PHASE_PATTERN.search(second).groups() == ("aggregate", "12.5")


def test_a_real_clock_counts_from_the_round_start():
    clock = PhaseClock()
    m = PHASE_PATTERN.search(clock.mark("train"))
    assert m.group(1) == "train" and 0.0 <= float(m.group(2)) < 60.0


def test_the_pattern_reads_the_line_inside_flowers_log_prefix():
    line = "INFO :      " + phase_line("test", 3601.04, ("validation", 2.0)) + "\n"
    assert PHASE_PATTERN.search(line).groups() == ("test", "3601.0")
