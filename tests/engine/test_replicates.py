"""Replicates: configs per seed, the over-seed table against a hand computation, the entry point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy.stats import t as scipy_t

from fl_merge.engine import replicates as rep
from fl_merge.io.results import RESULTS_FILE, RUN_FILE, write_rows

T2 = 4.302653  # Student t quantile t_{2, 0.975} (table)

# seed -> model -> task -> test accuracy (base at eta 0, methods at their chosen eta)
ACC = {
    0: {"task_arithmetic": {"a": 0.70, "b": 0.60}, "ties": {"a": 0.74, "b": 0.62},
        "base": {"a": 0.5, "b": 0.4}},
    1: {"task_arithmetic": {"a": 0.72, "b": 0.62}, "ties": {"a": 0.75, "b": 0.65},
        "base": {"a": 0.5, "b": 0.5}},
    2: {"task_arithmetic": {"a": 0.68, "b": 0.58}, "ties": {"a": 0.73, "b": 0.59},
        "base": {"a": 0.4, "b": 0.4}},
}


def _fake_run(root: Path, seed: int, config: dict | None = None) -> Path:
    """A run directory as write_outputs leaves it (run.json + results.csv), hand-made."""
    d = root / f"seed-{seed}"
    d.mkdir(parents=True)
    rows = []
    for label in ("task_arithmetic", "ties"):
        for task in ("a", "b"):
            rows.append({"method": label, "model": "base", "eta": 0.0, "selected": False, "split": "test",
                         "task": task, "accuracy": ACC[seed]["base"][task]})
            rows.append({"method": label, "model": "merged", "eta": 0.5, "selected": True, "split": "test",
                         "task": task, "accuracy": ACC[seed][label][task]})
            rows.append({"method": label, "model": "merged", "eta": 0.5, "selected": True, "split": "val",
                         "task": task, "accuracy": 0.99})  # val is never reported
            rows.append({"method": label, "model": "merged", "eta": 1.0, "selected": False, "split": "test",
                         "task": task, "accuracy": 0.01})  # not the choice
    write_rows(d / RESULTS_FILE, rows)
    # within-run bootstrap: ties - TA excluded 0 in seed 0 only
    comparison = [{"model": "ties", "reference": "task_arithmetic", "excludes_zero": seed == 0}]
    cfg = {"num-clients": 2, "method": "task_arithmetic,ties", "seed": seed, "output-dir": str(d),
           **(config or {})}
    (d / RUN_FILE).write_text(json.dumps({"config": cfg, "methods": {
        "task_arithmetic": {"name": "task_arithmetic", "params": {}, "eta": 0.5},
        "ties": {"name": "ties", "params": {"density": 0.2}, "eta": 0.5}}, "comparison": comparison}))
    return d


def test_replicate_configs_change_only_seed_and_output_dir(tmp_path):
    got = rep.replicate_configs({"num-clients": "2", "method": "ties"}, [0, 3], tmp_path)
    assert got == [{"num-clients": "2", "method": "ties", "seed": 0, "output-dir": str(tmp_path / "seed-0")},
                   {"num-clients": "2", "method": "ties", "seed": 3, "output-dir": str(tmp_path / "seed-3")}]
    both = rep.replicate_configs({"lr": "0.1"}, [5], tmp_path, data_seeds=True)
    assert both == [{"lr": "0.1", "seed": 5, "data-seed": 5, "output-dir": str(tmp_path / "seed-5")}]
    with pytest.raises(ValueError, match="data-seed is set per replicate"):
        rep.replicate_configs({"data-seed": 1}, [5], tmp_path, data_seeds=True)
    with pytest.raises(ValueError, match="seed is set per replicate"):
        rep.replicate_configs({"seed": 4}, [0, 1], tmp_path)
    assert rep.parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="distinct integers"):
        rep.parse_seeds("1,1")
    with pytest.raises(ValueError, match="comma-separated integers"):
        rep.parse_seeds("a,b")


def test_replicate_table_matches_hand_computation(tmp_path):
    rows = rep.write_replicates([_fake_run(tmp_path, s) for s in (0, 1, 2)], tmp_path)
    by = {r["model"]: r for r in rows}
    assert list(by) == ["task_arithmetic", "ties", "base"]
    # ties per seed (mean over tasks): 0.68, 0.70, 0.66 -> mean 0.68, s = 0.02
    assert by["ties"]["mean"] == pytest.approx(0.68)
    assert by["ties"]["ci_high"] - 0.68 == pytest.approx(T2 * 0.02 / math.sqrt(3), rel=1e-5)
    # ties - TA per seed: 0.68-0.65, 0.70-0.67, 0.66-0.63 = 0.03 each: zero spread, excludes 0
    assert by["ties"]["diff"] == pytest.approx(0.03)
    assert by["ties"]["diff_low"] == pytest.approx(0.03) and by["ties"]["excludes_zero"]
    assert by["ties"]["within_seed_marked"] == "1/3" and by["base"]["within_seed_marked"] == ""
    # base: 0.45, 0.50, 0.40 -> mean 0.45, s = 0.05; base - TA: -0.20, -0.17, -0.23 -> s = 0.03
    assert by["base"]["ci_low"] == pytest.approx(0.45 - T2 * 0.05 / math.sqrt(3), rel=1e-5)
    assert by["base"]["diff_high"] == pytest.approx(-0.20 + T2 * 0.03 / math.sqrt(3), rel=1e-5)
    assert by["base"]["excludes_zero"]
    ta = by["task_arithmetic"]
    assert (ta["diff"], ta["diff_low"], ta["diff_high"], ta["excludes_zero"]) == (0.0, 0.0, 0.0, False)
    assert (tmp_path / rep.TABLE_FILE).read_text().splitlines()[0] == (
        "model,method_name,n_seeds,seeds,per_seed,mean,ci_low,ci_high,reference,diff,diff_low,"
        "diff_high,excludes_zero,p_value,p_adjusted,correction,significant,within_seed_marked")
    assert (tmp_path / rep.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # marks are Holm-adjusted over the family {ties, base}: ties' (near-)constant gap has p ~ 0;
    # base's p from the t test of its differences; Holm multiplies the smaller p (ties') by
    # 2 and the larger (base's) by 1, then takes the running maximum
    t = (-0.20) / (0.03 / math.sqrt(3))
    p_base = 2 * scipy_t.sf(abs(t), 2)
    assert by["base"]["p_value"] == pytest.approx(p_base, rel=1e-6)
    assert by["base"]["p_adjusted"] == pytest.approx(p_base, rel=1e-6)  # max(2*0, 1*p)
    assert by["ties"]["p_adjusted"] < 1e-20 and by["ties"]["significant"]
    assert math.isnan(ta["p_value"]) and not ta["significant"]
    text = rep.format_table(rows)
    assert "ties" in text and " *" in text
    assert "Holm-adjusted p < 0.05 over the family of 2 comparisons vs task_arithmetic" in text


def test_the_correction_is_an_option_benjamini_hochberg_written_out(tmp_path, capsys):
    dirs = [_fake_run(tmp_path, s) for s in (0, 1, 2)]
    rows = {r["model"]: r for r in rep.write_replicates(dirs, tmp_path / "bh", correction="bh")}
    # BH over m = 2 sorted p-values p(1) <= p(2): adjusted p(2) = p(2), p(1) = min(2 p(1), p(2))
    p = sorted((rows[m]["p_value"], m) for m in ("ties", "base"))
    assert rows[p[1][1]]["p_adjusted"] == pytest.approx(p[1][0], rel=1e-9)
    assert rows[p[0][1]]["p_adjusted"] == pytest.approx(min(2 * p[0][0], p[1][0]), rel=1e-9)
    assert {rows[m]["correction"] for m in ("ties", "base")} == {"bh"}
    assert rep.main(["--table", *map(str, dirs), "--out", str(tmp_path / "cli"), "--correction", "bh"]) == 0
    assert "Benjamini-Hochberg" in capsys.readouterr().out


def test_one_seed_has_unknown_interval(tmp_path):
    rows = rep.replicate_table([_fake_run(tmp_path, 1)])
    assert rows[1]["mean"] == pytest.approx(0.70) and math.isnan(rows[1]["ci_low"])
    assert not rows[1]["excludes_zero"] and "intervals are nan" in rep.format_table(rows)
    assert not any(r["significant"] for r in rows) and " *" not in rep.format_table(rows)
    assert "no difference is marked" in rep.format_table(rows)


def test_runs_of_different_configs_are_not_replicates(tmp_path):
    dirs = [_fake_run(tmp_path, 0), _fake_run(tmp_path, 1, {"num-clients": 4})]
    with pytest.raises(ValueError, match=r"is not a replicate of .*: run config differs in num-clients"):
        rep.replicate_table(dirs)


def test_entry_point_runs_each_seed_then_builds_the_table(tmp_path, capsys):
    asked = []

    def fake(cfg):
        asked.append(cfg)
        return _fake_run(tmp_path / "runs", cfg.run.seed)

    out = tmp_path / "rep"
    argv = ["--seeds", "0,1,2", "--out", str(out), "--", "num-clients=2", "local-steps=5"]
    assert rep.main(argv, run=fake) == 0
    assert [c.run.seed for c in asked] == [0, 1, 2] and all(c.run.local_steps == "5" for c in asked)
    assert asked[1].run.output_dir == str(out / "seed-1")
    assert (out / rep.TABLE_FILE).exists()
    assert "paired difference vs task_arithmetic" in capsys.readouterr().out


def test_entry_point_rejects_a_bad_config_before_any_run(tmp_path, capsys):
    def never(cfg):
        raise AssertionError("no run may start")

    argv = ["--seeds", "0,1", "--out", str(tmp_path), "--", "num-clients=2", "nope=1"]
    assert rep.main(argv, run=never) == 2
    assert "unknown run-config key 'nope'" in capsys.readouterr().err
    assert rep.main(["--out", str(tmp_path)], run=never) == 2
    assert "give --seeds" in capsys.readouterr().err


def test_fl_merge_run_seeds_runs_each_seed_through_the_run_path(tmp_path, monkeypatch, capsys):
    """fl-merge-run --seeds: one call of fl_merge.engine.run.run per seed (same config but seed and
    output dir), then the table; a seed also given in --run-config is refused before any run."""
    from fl_merge.cli import launch
    from fl_merge.engine.run import Outcome

    asked = []

    def fake_run(cfg, **kw):
        asked.append(cfg)
        return Outcome(_fake_run(tmp_path / "runs", cfg.run.seed), [], {})

    monkeypatch.setattr(launch, "run", fake_run)
    out = tmp_path / "rep"
    rc = launch.main(["--engine", "simulation", "--seeds", "0,1,2",
                      "--run-config", f"num-clients=2 local-steps=\"5\" output-dir=\"{out}\""])
    assert rc == 0, capsys.readouterr().err
    assert [c.run.seed for c in asked] == [0, 1, 2] and {c.run.local_steps for c in asked} == {"5"}
    assert [c.run.output_dir for c in asked] == [str(out / f"seed-{s}") for s in (0, 1, 2)]
    assert (out / rep.TABLE_FILE).exists()
    assert "paired difference vs task_arithmetic" in capsys.readouterr().out
    asked.clear()
    assert launch.main(["--seeds", "0,1", "--run-config", "seed=3"]) == 2
    assert "drop seed= from --run-config" in capsys.readouterr().err
    assert launch.main(["--seeds", "0,0"]) == 2 and "distinct" in capsys.readouterr().err
    assert asked == []


def test_fl_merge_run_seeds_names_a_replicates_lost_client_last_and_exits_3(tmp_path, monkeypatch, capsys):
    """A replicate that finished without a client (seed 1 here) is named at the end with its
    seed, and the command exits 3 (min-clients 0 allows no loss)."""
    from fl_merge.cli import launch
    from fl_merge.engine.run import Outcome

    lost = {"failures": [{"client": "node 4 (partition 1)", "task": "invert", "stage": "train",
                          "reason": "non-finite update in backbone.0.weight"}], "missing_tasks": ["invert"]}

    def fake_run(cfg, **kw):
        return Outcome(_fake_run(tmp_path / "runs", cfg.run.seed), [], lost if cfg.run.seed == 1 else {})

    monkeypatch.setattr(launch, "run", fake_run)
    rc = launch.main(["--engine", "simulation", "--seeds", "0,1",
                      "--run-config", f"num-clients=2 output-dir=\"{tmp_path / 'rep'}\""])
    err = capsys.readouterr().err.splitlines()
    assert rc == 3
    assert err[-2:] == ["fl-merge-run: seed 1: the results lost 1 of 2 clients; exit status 3 (to accept a "
                        "run that keeps at least 1, set min-clients=1)",
                        "fl-merge-run: seed 1: task invert, node 4 (partition 1), lost at train: non-finite "
                        "update in backbone.0.weight; not merged, no results"]
