"""`fl-merge report`: runs found at any depth, only comparable runs ranked together, the
setting chosen on validation and test reported at that choice (synthetic runs, no Flower)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fl_merge import cli

from fl_merge.stats import selection

from fl_merge.io import store
from fl_merge.io.results import RESULTS_FILE, RUN_FILE, read_rows, write_json, write_rows


def make_run(run_dir: Path, config: dict, scores: dict[str, tuple[float, float]]) -> Path:
    """A run dir: per method (val, test) accuracy of the merged model at its chosen eta 1
    (fine-tuned 1.0, so normalized = accuracy), the base at eta 0, and run.json's config."""
    rows = []
    for method, (val, test) in scores.items():
        for split, acc in (("val", val), ("test", test)):
            common = {"method": method, "task": "t0", "split": split, "finetuned_accuracy": 1.0}
            rows.append({**common, "model": "base", "eta": 0.0, "selected": False,
                         "accuracy": 0.1, "normalized_accuracy": 0.1})
            rows.append({**common, "model": "merged", "eta": 1.0, "selected": True,
                         "accuracy": acc, "normalized_accuracy": acc})
    write_rows(run_dir / RESULTS_FILE, rows)
    write_json(run_dir / RUN_FILE, {"config": {"num-clients": 2, "local-steps": "150", "seed": 0,
                                               "output-dir": str(run_dir), **config}})
    return run_dir


@pytest.fixture
def nested(tmp_path: Path) -> Path:
    """Hydra single runs at depth 3 (outputs/<date>/<time>): two of K=2 (seeds 0 and 1),
    one of K=4 with other local steps, whose fedavg scores would win a mixed ranking."""
    out = tmp_path / "outputs"
    make_run(out / "2026-01-01" / "12-00-00", {"seed": 0}, {"fedavg": (0.60, 0.50), "ties": (0.70, 0.65)})
    make_run(out / "2026-01-01" / "12-30-00", {"seed": 1}, {"fedavg": (0.62, 0.54), "ties": (0.72, 0.61)})
    make_run(out / "2026-01-02" / "09-00-00", {"num-clients": 4, "local-steps": "30"},
             {"fedavg": (0.95, 0.90), "ties": (0.20, 0.20)})
    return out


def test_runs_at_any_depth_are_found_and_grouped_by_config(nested: Path):
    rows = store.load_sweep(nested)
    runs = {r["run_dir"]: r["group"] for r in rows}
    assert len(runs) == 3  # the old glob of */results.csv found none of them
    k2 = {g for d, g in runs.items() if "2026-01-01" in d}
    k4 = {g for d, g in runs.items() if "2026-01-02" in d}
    assert len(k2) == 1 and len(k4) == 1 and k2 != k4  # seeds together, other K apart
    about = selection.describe_groups(rows)
    assert about[k4.pop()] == "local-steps=30 num-clients=4"


def test_best_setting_per_group_is_averaged_over_seeds(nested: Path):
    best = {(b["group"], b["method"]): b for b in selection.best_settings(store.load_sweep(nested))}
    assert len(best) == 4  # 2 groups x 2 methods: K=4's fedavg is not K=2's best
    k2_fedavg = next(b for (g, m), b in best.items() if m == "fedavg" and b["runs"] == 2)
    assert k2_fedavg["val_normalized_accuracy"] == pytest.approx((0.60 + 0.62) / 2)
    assert k2_fedavg["test_normalized_accuracy"] == pytest.approx((0.50 + 0.54) / 2)


def test_setting_is_chosen_on_val_and_test_shown_at_that_choice(tmp_path: Path):
    """density 0.2 wins on val (0.80 > 0.70), density 0.5 would win on test (0.90 > 0.60):
    the report picks 0.2 and shows 0.60, not 0.90."""
    make_run(tmp_path / "a", {"method": "ties", "method-params": "ties.density=0.2"}, {"ties": (0.80, 0.60)})
    make_run(tmp_path / "b", {"method": "ties", "method-params": "ties.density=0.5"}, {"ties": (0.70, 0.90)})
    rows = store.load_sweep(tmp_path)
    assert len({r["group"] for r in rows}) == 1  # differ only in the method's parameters
    (best,) = selection.best_settings(rows)
    assert best["setting"] == "method-params=ties.density=0.2"
    assert (best["val_normalized_accuracy"], best["test_normalized_accuracy"]) == (0.80, 0.60)


def test_a_sweep_store_is_one_group_and_its_jobs_are_not_counted_twice(tmp_path: Path):
    sweep = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    for job, alpha in enumerate((0.1, 1.0)):
        run = make_run(sweep / str(job), {"alpha": alpha}, {"fedavg": (0.5 + alpha / 10, 0.4)})
        store.append_rows(sweep / RESULTS_FILE, store.job_rows(
            read_rows(run / RESULTS_FILE), job, str(job), [f"data.alpha={alpha}"], f"h{job}"))
    make_run(tmp_path / "outputs" / "x", {}, {"fedavg": (0.99, 0.99)})
    rows = store.load_sweep(tmp_path)
    assert len({r["run_dir"] for r in rows}) == 3
    best = {b["group"]: b for b in selection.best_settings(rows)}
    assert best["sweep multirun/2026-01-01/12-00-00"]["setting"] == "data.alpha=1.0"
    assert best["sweep multirun/2026-01-01/12-00-00"]["runs"] == 1


def test_report_command_prints_each_group_apart(nested: Path, capsys):
    assert cli.main(["report", str(nested)]) == 0
    out = capsys.readouterr().out
    assert "3 run(s) in 2 group(s)" in out and "never ranked together" in out
    assert out.count("best setting per method (chosen on val") == 2
    assert "(local-steps=30 num-clients=4)" in out
    written = {p.name for p in (nested / "report").iterdir()}
    assert {"best.csv", "accuracy_vs_eta_1.png", "accuracy_vs_eta_2.png"} <= written
    best = read_rows(nested / "report" / "best.csv")
    assert len(best) == 4 and not any(math.isnan(b["test_normalized_accuracy"]) for b in best)


def test_report_of_a_directory_without_runs_is_one_error(tmp_path: Path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fl-merge report: error:") and "no results" in err and err.count("\n") == 1


def test_report_on_a_fake_heterogeneous_sweep(tmp_path, capsys):
    """Runs that differ in a het_ measure also get the accuracy-vs-heterogeneity figure."""
    sweep = tmp_path / "sweep"
    for job, (alpha, acc) in enumerate([(0.1, 0.6), (1.0, 0.9)]):
        run_rows = []
        for method in ("fedavg", "ties"):
            for split in ("val", "test"):
                for model, eta, sel in (("base", 0.0, False), ("merged", 1.0, True)):
                    run_rows.append({"het_mean_cosine": alpha, "method": method, "task": "t0",
                                     "model": model, "eta": eta, "selected": sel, "split": split,
                                     "accuracy": acc, "finetuned_accuracy": 1.0,
                                     "normalized_accuracy": acc if model == "merged" else 0.5})
        write_rows(sweep / str(job) / "results.csv", run_rows)
        (sweep / str(job) / "run.json").write_text(json.dumps({"config": {"alpha": alpha}}))
        store.append_rows(sweep / "results.csv", store.job_rows(
            run_rows, job, str(job), ["method.name=[fedavg,ties]", f"data.alpha={alpha}", f"seed={job}"], "h"))
    assert cli.main(["report", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "data.alpha=1.0" in out.split("best setting")[1]
    for name in ("across_het_mean_cosine.png", "across_alpha.png"):
        assert (sweep / "report" / name).is_file(), out
    assert not (sweep / "report" / "across_seed.png").exists()  # seeds are replicates

