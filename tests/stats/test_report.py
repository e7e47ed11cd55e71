"""fl_merge.stats.report, and `fl-merge report` drawing its figures, on synthetic run
directories (no Flower run)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fl_merge import cli
from fl_merge.stats.report import across_runs_figure, collect_points, run_figure
from fl_merge.io.results import RESULTS_FILE, RUN_FILE, read_rows, write_json, write_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASKS = ["t0", "t1", "t2"]
METHODS = {"fedavg": 1.0, "ties": 1.5}  # label -> selected eta
ETAS = [0.5, 1.0, 1.5]


def _acc(run: int, method: str, task: int, eta: float) -> float:
    """A deterministic, distinct accuracy per (run, method, task, eta)."""
    return round(0.3 + 0.1 * run + 0.05 * task + 0.02 * eta + (0.03 if method == "ties" else 0.0), 4)


def _finetuned(task: int) -> float:
    return 0.8 + 0.05 * task


def make_run(root: Path, run: int, mean_cosine: float, alpha: float, tasks: list[str] = TASKS,
             heterogeneity: bool = True) -> Path:
    """A run directory with results.csv + run.json shaped like a real multi-method run."""
    run_dir = root / f"run{run}"
    rows = []
    for method, chosen in METHODS.items():
        for split in ("val", "test"):
            for ti, task in enumerate(tasks):
                ft = _finetuned(ti)
                common = {"method": method, "method_name": method, "params": "{}", "task": task,
                          "partition_id": ti, "node_id": 100 + ti, "split": split,
                          "finetuned_accuracy": ft}
                rows.append({**common, "model": "finetuned", "eta": math.nan, "selected": False,
                             "accuracy": ft, "loss": math.nan, "normalized_accuracy": 1.0})
                rows.append({**common, "model": "base", "eta": 0.0, "selected": False,
                             "accuracy": 0.2, "loss": 2.0, "normalized_accuracy": 0.2 / ft})
                for eta in ETAS:
                    acc = _acc(run, method, ti, eta)
                    rows.append({**common, "model": "merged", "eta": eta, "selected": eta == chosen,
                                 "accuracy": acc, "loss": 1.0, "normalized_accuracy": acc / ft})
    extra = {"run_id": run, "num_clients": len(tasks), "data": "dirichlet",
             "het_mean_cosine": mean_cosine, "het_norm_mean": 1.0 + run}
    write_rows(run_dir / RESULTS_FILE, rows, extra=extra)
    k = len(tasks)
    meta = {"run_id": run,
            "config": {"num-clients": k, "data": "dirichlet", "alpha": alpha, "method": "fedavg,ties"},
            "tasks": tasks,
            "methods": {m: {"name": m, "params": {}, "eta": e} for m, e in METHODS.items()},
            "clients": [{"task": t, "node_id": 100 + i, "local-steps": 10, "lr": 0.01}
                        for i, t in enumerate(tasks)]}
    if heterogeneity:
        cos = [[1.0 if i == j else mean_cosine - 0.1 * abs(i - j) for j in range(k)] for i in range(k)]
        meta["heterogeneity"] = {"num_clients": k, "norms": [1.0 + 0.2 * i for i in range(k)],
                                 "cosine_matrix": cos, "mean_cosine": mean_cosine}
    write_json(run_dir / RUN_FILE, meta)
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    # Given out of x order on purpose: (mean_cosine, alpha) per run.
    return [make_run(tmp_path, 0, 0.6, 10.0), make_run(tmp_path, 1, -0.1, 0.1),
            make_run(tmp_path, 2, 0.3, 1.0)]


def _expected(run: int, method: str) -> float:
    eta = METHODS[method]
    return sum(_acc(run, method, ti, eta) / _finetuned(ti) for ti in range(len(TASKS))) / len(TASKS)


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes


def test_run_figure(runs: list[Path]) -> None:
    out = run_figure(runs[0])
    assert out == runs[0] / "report.png"
    assert_png(out)
    assert not [p for p in runs[0].iterdir() if ".tmp" in p.name]


def test_run_figure_eight_tasks(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, 0, 0.2, 1.0, tasks=[f"task-number-{i}" for i in range(8)])
    assert_png(run_figure(run_dir))


def test_run_figure_without_heterogeneity(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, 0, 0.2, 1.0, heterogeneity=False)
    assert_png(run_figure(run_dir), min_bytes=5_000)


def test_collect_points_het_measure(runs: list[Path]) -> None:
    for measure in ("mean_cosine", "het_mean_cosine"):
        points = collect_points(runs, measure)
        assert [p["x"] for p in points] == sorted(p["x"] for p in points)
        assert [(p["x"], p["method"]) for p in points] == [
            (-0.1, "fedavg"), (-0.1, "ties"), (0.3, "fedavg"), (0.3, "ties"),
            (0.6, "fedavg"), (0.6, "ties")]
        by_x = {-0.1: 1, 0.3: 2, 0.6: 0}
        for p in points:
            run = by_x[p["x"]]
            assert p["run_dir"] == str(runs[run])
            assert p["eta"] == METHODS[p["method"]]
            assert p["normalized_accuracy"] == pytest.approx(_expected(run, p["method"]))
            assert p["accuracy"] == pytest.approx(
                sum(_acc(run, p["method"], ti, p["eta"]) for ti in range(3)) / 3)


def test_collect_points_config_measure(runs: list[Path]) -> None:
    points = collect_points(runs, "alpha")
    assert [(p["x"], p["method"]) for p in points] == [
        (0.1, "fedavg"), (0.1, "ties"), (1.0, "fedavg"), (1.0, "ties"),
        (10.0, "fedavg"), (10.0, "ties")]
    assert points[0]["normalized_accuracy"] == pytest.approx(_expected(1, "fedavg"))
    assert points[-1]["normalized_accuracy"] == pytest.approx(_expected(0, "ties"))


def test_collect_points_val_split(runs: list[Path]) -> None:
    points = collect_points(runs, "alpha", split="val")
    assert len(points) == 6  # synthetic val == test accuracies
    assert points[0]["normalized_accuracy"] == pytest.approx(_expected(1, "fedavg"))


def test_missing_measure_raises(runs: list[Path]) -> None:
    with pytest.raises(ValueError, match="no_such_measure"):
        collect_points(runs, "no_such_measure")


def test_missing_results_raises(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="results.csv"):
        collect_points([tmp_path / "empty"], "alpha")


def test_across_runs_figure(runs: list[Path], tmp_path: Path) -> None:
    out = across_runs_figure(runs, "alpha", tmp_path / "fig" / "alpha.png", logx=True)
    assert out == tmp_path / "fig" / "alpha.png"
    assert_png(out)
    csv_rows = read_rows(out.with_suffix(".csv"))
    assert [(r["x"], r["method"]) for r in csv_rows] == [
        (p["x"], p["method"]) for p in collect_points(runs, "alpha")]
    assert csv_rows[0]["normalized_accuracy"] == pytest.approx(_expected(1, "fedavg"))


def test_across_runs_absolute_accuracy(runs: list[Path], tmp_path: Path) -> None:
    out = across_runs_figure(runs, "alpha", tmp_path / "abs.png", y="accuracy")
    assert_png(out)
    with pytest.raises(ValueError, match="y must be"):
        across_runs_figure(runs, "alpha", tmp_path / "bad.png", y="loss")


def test_logx_rejects_nonpositive(runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mean_cosine"):
        across_runs_figure(runs, "mean_cosine", tmp_path / "c.png", logx=True)


def test_the_one_report_command_draws_what_the_figures_module_draws(
        runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fl-merge report DIR` (the only report command) with the options the removed
    `python -m fl_merge.stats.report` had: --split, --logx, every run's own figure."""
    for run_dir in runs:  # val accuracy 0.01 below test in each merged row: --split shows it
        rows = read_rows(run_dir / RESULTS_FILE)
        for r in rows:
            if r["split"] == "val" and r["model"] == "merged":
                r["accuracy"] = round(r["accuracy"] - 0.01, 4)
                r["normalized_accuracy"] = r["accuracy"] / r["finetuned_accuracy"]
        write_rows(run_dir / RESULTS_FILE, rows)
    assert cli.main(["report", str(tmp_path), "--measure", "alpha", "--logx", "--split", "val",
                     "--run-figures"]) == 0
    png = tmp_path / "report" / "across_alpha.png"
    assert_png(png)
    points = read_rows(png.with_suffix(".csv"))
    assert [p["x"] for p in points] == [0.1, 0.1, 1.0, 1.0, 10.0, 10.0]  # alpha, sorted
    run1_ties = [p for p in points if p["x"] == 0.1 and p["method"] == "ties"][0]
    want = sum((_acc(1, "ties", ti, 1.5) - 0.01) / _finetuned(ti) for ti in range(3)) / 3
    assert run1_ties["normalized_accuracy"] == pytest.approx(want, rel=1e-3)
    for run_dir in runs:
        assert_png(run_dir / "report.png")
    printed = capsys.readouterr().out
    assert str(png) in printed and str(runs[1] / "report.png") in printed
    with pytest.raises(SystemExit):
        cli.main(["report", str(tmp_path), "--split", "train"])
    assert cli.main(["report", str(tmp_path), "--measure", "mean_cosine", "--logx"]) == 0
    assert "skipped mean_cosine: --logx needs positive values" in capsys.readouterr().err


