"""A chosen eta at the edge of its grid is named: the best eta may lie outside what was
tried. The decision (grid_edge), the round's notes (edge_notes) and the summary's warning
lines read from a results table."""

from __future__ import annotations

import json

from fl_merge.io.results import edge_notes as table_edge_notes
from fl_merge.io.results import format_summary
from fl_merge.models.evaluation import edge_note, grid_edge
from fl_merge.round.selection import edge_notes


def test_grid_edge_is_the_top_or_the_lowest_eta_above_the_base():
    grid = [0.0, 0.5, 1.0, 2.0]
    assert grid_edge(2.0, grid) == "largest"
    assert grid_edge(0.5, grid) == "smallest"  # 0 is the base, never a candidate
    assert grid_edge(1.0, grid) is None
    assert grid_edge(1.0, [0.0, 1.0]) is None  # one eta: nothing was searched
    assert grid_edge(3.0, grid) is None  # not from this grid


def test_edge_note_says_which_side_and_the_grid():
    note = edge_note("ties", 2.0, [0.0, 2.0, 0.5, 1.0])
    assert note == ("ties: the chosen eta=2 is the largest of the 3 tried (0.5..2): the best may lie "
                    "above the grid; widen it (lambdas= or etas=)")
    assert "below the grid" in edge_note("fedavg", 0.5, [0.0, 0.5, 1.0])
    assert edge_note("fedavg", 1.0, [0.0, 0.5, 1.0, 2.0]) is None


def test_round_notes_one_per_method_at_an_edge():
    choice = {"fedavg": ("fedavg", 1.0, 0.9), "ties": ("ties[density=0.2]", 4.0, 0.8),
              "learned-task": ("learned-task", 1.0, 0.95)}
    grids = {"fedavg": [0.0, 0.5, 1.0, 2.0], "ties[density=0.2]": [0.0, 1.0, 4.0],
             "ties[density=0.5]": [0.0, 1.0, 8.0], "learned-task": [0.0, 1.0]}
    notes = edge_notes(choice, grids)
    assert len(notes) == 1 and notes[0].startswith("ties: the chosen eta=4 is the largest of the 2 tried (1..4)")


def _rows(method: str, knobs: dict, val: dict[float, float], chosen: float | None) -> list[dict]:
    """Rows as a results table holds them: val at every eta, test at the chosen one."""
    common = {"method": method, "knobs": json.dumps(knobs), "task": "t0", "normalized_accuracy": 1.0}
    rows = [{**common, "model": "base" if eta == 0 else "merged", "eta": eta, "split": "val",
             "accuracy": acc, "selected": eta == chosen} for eta, acc in val.items()]
    if chosen is not None:
        rows.append({**common, "model": "merged", "eta": chosen, "split": "test", "accuracy": 0.7,
                     "selected": True})
    return rows


def test_summary_warns_from_the_chosen_settings_own_grid():
    rows = [*_rows("ties", {"density": 0.2}, {0.0: 0.5, 1.0: 0.6, 2.0: 0.7}, 2.0),
            # another setting of ties went further up the grid, but was not chosen
            *_rows("ties", {"density": 0.5}, {0.0: 0.5, 1.0: 0.6, 2.0: 0.6, 4.0: 0.65}, None),
            *_rows("fedavg", {}, {0.0: 0.5, 0.5: 0.6, 1.0: 0.7, 2.0: 0.6}, 1.0)]
    summary = format_summary(rows)
    warnings = [line for line in summary.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: ties: the chosen eta=2 is the largest of the 2 tried (1..2): the best "
                        "may lie above the grid; widen it (lambdas= or etas=)"]
    # the prescreen's rows (split val-prescreen) hold the whole grid; finalists only part of it
    pre = [{**r, "split": "val-prescreen", "selected": False}
           for r in _rows("ties", {"density": 0.2}, {3.0: 0.65}, None)]
    assert table_edge_notes([*rows, *pre]) == []  # 2 is inside 1..3
