"""experiments/results_table.py: the suite tables are computed from a run's tidy rows as the
docs say (test split, eta chosen on validation, normalized = merged / individual), and
regenerating one suite keeps the other suite's section in docs/results.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fl_merge.io.results import write_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results_table():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "experiments" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows() -> list[dict]:
    rows = []
    finetuned = {"a": 0.9, "b": 0.8}
    base = {"a": 0.5, "b": 0.4}
    merged = {("fedavg", 0.5): {"a": 0.7, "b": 0.6}, ("fedavg", 1.0): {"a": 0.2, "b": 0.1},
              ("ties", 0.5): {"a": 0.6, "b": 0.7}}
    for method in ("fedavg", "ties"):
        for task in ("a", "b"):
            for split in ("val", "test"):
                common = {"method": method, "task": task, "split": split,
                          "finetuned_accuracy": finetuned[task]}
                rows.append({**common, "model": "finetuned", "eta": float("nan"), "selected": False,
                             "accuracy": finetuned[task], "normalized_accuracy": 1.0})
                rows.append({**common, "model": "base", "eta": 0.0, "selected": False,
                             "accuracy": base[task], "normalized_accuracy": base[task] / finetuned[task]})
                for (m, eta), acc in merged.items():
                    if m == method:
                        rows.append({**common, "model": "merged", "eta": eta,
                                     "selected": eta == 0.5, "accuracy": acc[task],
                                     "normalized_accuracy": acc[task] / finetuned[task]})
    return rows


def test_table_reports_test_accuracy_at_the_chosen_eta(tmp_path, results_table):
    write_rows(tmp_path / "results.csv", _rows())
    tasks, rows = results_table.table(tmp_path)
    assert tasks == ["a", "b"]
    by = {r["model"]: r for r in rows}
    assert list(by) == ["individual", "base (linear probe)", "fedavg", "ties"]
    assert by["fedavg"]["eta"] == "0.5"
    assert by["fedavg"]["a"] == pytest.approx(0.7) and by["fedavg"]["b"] == pytest.approx(0.6)
    assert by["fedavg"]["absolute"] == pytest.approx(0.65)
    assert by["fedavg"]["normalized"] == pytest.approx((0.7 / 0.9 + 0.6 / 0.8) / 2)
    assert by["ties"]["normalized"] == pytest.approx((0.6 / 0.9 + 0.7 / 0.8) / 2)
    assert by["base (linear probe)"]["absolute"] == pytest.approx(0.45)
    assert by["individual"]["normalized"] == pytest.approx(1.0)
    md = results_table.markdown("vision8", tasks, rows, "Run: test.")
    assert "| fedavg | 0.5 | 70.0 | 60.0 | 65.0 | 76.4 |" in md


def test_a_run_that_lost_a_client_is_refused_not_averaged(tmp_path, results_table):
    # ties' test score on task b is missing (its client was lost mid-run)
    rows = [r for r in _rows() if not (r["method"] == "ties" and r["model"] == "merged"
                                       and r["task"] == "b" and r["split"] == "test")]
    write_rows(tmp_path / "results.csv", rows)
    with pytest.raises(SystemExit, match="ties has no test score for b .*rerun with --rerun"):
        results_table.table(tmp_path)


def test_timing_line_says_cold_or_cached(tmp_path, results_table):
    (tmp_path / "run.json").write_text(json.dumps({"clients": [{"cached": 0}, {"cached": 0}]}))
    (tmp_path / "wall.json").write_text(json.dumps({"seconds": 600}))
    assert (results_table.timing_line(tmp_path)
            == "Run: 10.0 min wall on 2 CPU cores, cold: every client trained.")
    (tmp_path / "run.json").write_text(json.dumps({"clients": [{"cached": 1}, {"cached": 0}]}))
    assert "1 of 2 client updates from the cache" in results_table.timing_line(tmp_path)


def test_regenerating_one_suite_keeps_the_other(results_table):
    b, e = results_table.BEGIN, results_table.END
    doc = f"intro\n{b}\n### vision8\n\nold vision\n\n### text\n\nold text\n{e}\noutro\n"
    new = results_table.update_doc(doc, ["### text\n\nnew text"])
    assert new == f"intro\n{b}\n### vision8\n\nold vision\n\n### text\n\nnew text\n{e}\noutro\n"
    first = results_table.update_doc(f"x{b}\n{e}y", ["### text\n\nT", "### vision8\n\nV"])
    assert first == f"x{b}\n### vision8\n\nV\n\n### text\n\nT\n{e}y"
    with pytest.raises(ValueError, match="markers"):
        results_table.update_doc("no markers", [])


def test_plot_draws_the_comparison_of_a_run(tmp_path, results_table):
    comparison = [
        {"model": "base", "accuracy": 0.5, "ci_low": 0.45, "ci_high": 0.55},
        {"model": "fedavg", "accuracy": 0.7, "ci_low": 0.65, "ci_high": 0.75, "reference": "fedavg",
         "diff": 0.0, "diff_low": 0.0, "diff_high": 0.0, "excludes_zero": False},
        {"model": "ties", "accuracy": 0.75, "ci_low": 0.7, "ci_high": 0.8, "reference": "fedavg",
         "diff": 0.05, "diff_low": 0.01, "diff_high": 0.09, "excludes_zero": True},
    ]
    comparison[0]["reference"] = "fedavg"
    (tmp_path / "run.json").write_text(json.dumps({"comparison": comparison}))
    out = tmp_path / "plot.png"
    results_table.plot("toy", tmp_path, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
