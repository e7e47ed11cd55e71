"""The within-run comparison as printed: one run is one seed, so nothing is marked (issue 27)."""

from fl_merge.round.tables import format_comparison


def test_a_one_seed_comparison_says_so_and_marks_nothing():
    rows = [{"model": "ta", "accuracy": 0.70, "ci_low": 0.68, "ci_high": 0.72, "reference": "ta",
             "diff": 0.0, "diff_low": 0.0, "diff_high": 0.0, "excludes_zero": False},
            {"model": "ties", "accuracy": 0.75, "ci_low": 0.73, "ci_high": 0.77, "reference": "ta",
             "diff": 0.05, "diff_low": 0.03, "diff_high": 0.07, "excludes_zero": True}]
    text = format_comparison(rows)
    head, *lines = text.splitlines()
    assert "one seed" in head and "over test examples only" in head and "uncorrected" in head
    assert "*" not in text  # the ties interval excludes 0, and still carries no mark
    assert lines[1].split() == ["ties", "0.750", "[0.730,", "0.770]", "+0.050", "[+0.030,", "+0.070]"]
    assert rows[1]["excludes_zero"] is True  # the raw fact stays in the rows


def test_without_a_reference_there_is_no_difference_column():
    text = format_comparison([{"model": "m", "accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6}])
    assert text.splitlines()[1].split() == ["m", "0.500", "[0.400,", "0.600]"]
    assert "difference" not in text and format_comparison([]) == ""
