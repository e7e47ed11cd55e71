"""experiments/_points.py, step_spread.py and results_table.py's pure parts: how step lists
are built, how replicated points are tabulated (against hand-computed t intervals), and how
the one-seed table reads its bootstrap CIs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from holm_reference import holm_by_hand

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def points():
    return _load("_points")


def test_steps_are_geometric_around_the_centre_and_rotate_with_the_seed():
    ss = _load("step_spread")
    assert ss.steps_for(16, 4) == [50, 126, 317, 800]  # 200 * 16^(i/3 - 1/2), by hand
    assert ss.steps_for(1, 4) == [200, 200, 200, 200]
    assert ss.steps_for(4, 3, center=100) == [50, 100, 200]
    assert ss.steps_for(16, 4, shift=1) == [126, 317, 800, 50]
    assert ss.steps_for(16, 4, shift=5) == ss.steps_for(16, 4, shift=1)
    with pytest.raises(ValueError, match="spread >= 1"):
        ss.steps_for(0.5, 4)


def test_tabulate_gives_t_intervals_and_paired_differences(points):
    # fedavg 0.5, 0.6, 0.7; fednova 0.6, 0.8, 0.7 -> differences 0.1, 0.2, 0.0.
    pts = [{"setting": "r=2", "seed": s, "acc": {"fedavg": a, "fednova": b},
            "measures": {"steps_cv": cv}, "within": {"fedavg": False, "fednova": s == 1}}
           for s, a, b, cv in ((0, 0.5, 0.6, 0.2), (1, 0.6, 0.8, 0.3), (2, 0.7, 0.7, 0.4))]
    rows = {r["model"]: r for r in points.tabulate(pts, "fedavg")}
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 0.1
    assert rows["fedavg"]["mean"] == pytest.approx(0.6)
    assert rows["fedavg"]["ci_low"] == pytest.approx(0.6 - half)
    assert rows["fedavg"]["diff"] == 0.0 and not rows["fedavg"]["excludes_zero"]
    assert rows["fednova"]["diff"] == pytest.approx(0.1)
    assert rows["fednova"]["diff_high"] == pytest.approx(0.1 + half)  # differences have s = 0.1
    assert not rows["fednova"]["excludes_zero"]  # 0.1 - 0.248 < 0
    assert rows["fednova"]["steps_cv"] == pytest.approx(0.3)
    assert rows["fednova"]["within_seed"] == "1/3"
    md = points.markdown_table(list(rows.values()), ["steps_cv"])
    assert "| r=2 | 0.3 | fednova | 70.0 [" in md and "| +10.0 [" in md and "*" not in md
    from scipy import stats as sps

    p = sps.ttest_1samp([0.1, 0.2, 0.0], 0.0).pvalue  # 0.225: one comparison, adjusted = raw
    assert md.splitlines()[3].endswith(f"] | {p:.2g} / {p:.2g} | 1/3 |")


def test_tabulate_marks_a_difference_whose_interval_excludes_zero(points):
    pts = [{"setting": "x", "seed": s, "acc": {"ta": 0.5, "m": 0.5 + d}, "measures": {}}
           for s, d in enumerate((0.10, 0.11, 0.12))]
    row = [r for r in points.tabulate(pts, "ta") if r["model"] == "m"][0]
    assert row["excludes_zero"] and row["diff_low"] > 0
    from scipy import stats as sps

    p = sps.ttest_1samp([0.10, 0.11, 0.12], 0.0).pvalue
    assert points.markdown_table([row], []).rstrip().endswith(f"+13.5] * | {p:.2g} / {p:.2g} |  |")


def test_table_families_adjust_over_the_table_methods_and_base_apart(points):
    from scipy import stats as sps

    # two settings; "t" is the same comparison in both (same updates), "u" differs, base apart
    d = {("a", "t"): (0.02, 0.03, 0.04), ("b", "t"): (0.02, 0.03, 0.04),
         ("a", "u"): (0.01, 0.03, 0.02), ("b", "u"): (0.00, 0.05, 0.01),
         ("a", "base"): (-0.1, -0.12, -0.11), ("b", "base"): (-0.2, -0.25, -0.22)}
    pts = [{"setting": st, "seed": k, "measures": {},
            "acc": {"ref": 0.5, **{m: 0.5 + v[k] for (s2, m), v in d.items() if s2 == st}}}
           for st in "ab" for k in range(3)]
    rows = points.table_families(points.tabulate(pts, "ref"))
    raw = {k: float(sps.ttest_1samp(v, 0.0).pvalue) for k, v in d.items()}
    methods = [("a", "t"), ("a", "u"), ("b", "u")]  # ("b", "t") is ("a", "t") again: counted once
    bases = [("a", "base"), ("b", "base")]
    want = {**dict(zip(methods, holm_by_hand([raw[k] for k in methods]))),
            **dict(zip(bases, holm_by_hand([raw[k] for k in bases])))}
    want[("b", "t")] = want[("a", "t")]
    by = {(r["setting"], r["model"]): r for r in rows}
    for k, q in want.items():
        assert by[k]["p_value"] == pytest.approx(raw[k]) and by[k]["p_adjusted"] == pytest.approx(q)
        assert by[k]["significant"] == (q < 0.05)
    assert by[("a", "u")]["family"] == "holm over 3 methods vs ref"
    assert by[("a", "base")]["family"] == "holm over 2 base vs ref"
    assert math.isnan(by[("a", "ref")]["p_adjusted"]) and not by[("a", "ref")]["significant"]
    assert "holm over 3 methods vs ref, holm over 2 base vs ref" in points.mark_caption(rows)


def test_tabulate_refuses_repeated_seeds_and_missing_reference(points):
    p = {"setting": "x", "seed": 0, "acc": {"ta": 0.5}, "measures": {}}
    with pytest.raises(ValueError, match="seed 0 twice"):
        points.tabulate([p, p], "ta")
    with pytest.raises(ValueError, match="no 'fedavg' accuracy"):
        points.tabulate([p], "fedavg")


def test_results_table_reads_the_bootstrap_comparison(tmp_path):
    rt = _load("results_table")
    (tmp_path / "run.json").write_text(json.dumps({"comparison": [
        {"model": "fedavg", "accuracy": 0.7, "ci_low": 0.68, "ci_high": 0.72, "reference": "fedavg",
         "diff": 0.0, "diff_low": 0.0, "diff_high": 0.0, "excludes_zero": False},
        {"model": "ties", "accuracy": 0.75, "ci_low": 0.73, "ci_high": 0.77, "reference": "fedavg",
         "diff": 0.05, "diff_low": 0.03, "diff_high": 0.07, "excludes_zero": True},
        {"model": "base", "accuracy": 0.5, "ci_low": 0.48, "ci_high": 0.52, "reference": "fedavg",
         "diff": -0.2, "diff_low": -0.22, "diff_high": -0.18, "excludes_zero": True}]}))
    cells = rt.comparison_cells(tmp_path)
    # one seed: the intervals are shown, no difference is marked (even where a CI excludes 0)
    assert cells["ties"] == ("[73.0, 77.0]", "+5.0 [+3.0, +7.0]")
    assert cells["fedavg"][1] == "(reference)"
    assert cells["base (linear probe)"][1] == "-20.0 [-22.0, -18.0]"
    rows = [{"model": "ties", "eta": "0.3", "a": 0.75, "absolute": 0.75, "normalized": 0.8}]
    md = rt.markdown("text", ["a"], rows, "Run: x.", cells)
    assert "vs fedavg [95% CI]" in md
    assert "| ties | 0.3 | 75.0 | 75.0 | 80.0 | [73.0, 77.0] | +5.0 [+3.0, +7.0] |" in md
    assert "One seed: no difference is marked" in md and " * |" not in md


def test_every_experiment_config_resolves():
    from fl_merge.config.run_config import RunConfig

    ss, dis, rt = _load("step_spread"), _load("dissimilarity"), _load("results_table")
    configs = [ss.overrides(16, 2), *(dis.overrides(s, 1) for s in dis.SUITES),
               *(rt.suite_overrides(s) for s in rt.SUITES)]
    for c in configs:
        RunConfig.from_flower({**c, "output-dir": "/tmp/unused"}).resolve()
    assert len(dis.SUITES) >= 6


def test_timing_line_sums_the_runs_it_knows(points):
    pts = [{"seconds": 90.0}, {"seconds": 150.0}, {"seconds": float("nan")}]
    assert points.timing_line(pts).startswith("3 runs, 4.0 min of run time in all (2 timed;")


def test_the_table_search_has_the_candidate_count_results_md_states():
    """docs/results.md: 168 validation candidates per vision8 run, by hand 7 lambdas x
    (1 fedavg + 1 fednova + 3 fedgma rho + 1 median + 8 cclip radii + 3 ties + 3 dare
    + 1 fisher + 3 hetero) = 7 x 24."""
    import torch

    from fl_merge.config.parsing import resolve_methods
    from fl_merge.round.candidates import method_spaces, plan_candidates

    rt = _load("results_table")
    o = rt.suite_overrides("vision8")
    methods = {n: (n, p) for n, p in resolve_methods(o["method"], o["method-params"], 8, search="paper")}
    tvs = [{"w": torch.full((3,), float(i + 1))} for i in range(8)]  # 8 distinct norms
    lambdas = [float(x) for x in str(o["lambdas"]).split(",")]
    cands = plan_candidates(methods, method_spaces(methods), "paper", lambdas, [], tvs)
    assert sum(1 for c in cands.values() for e in c.etas if e > 0) == 7 * 24


def test_write_tables_writes_points_csv_and_the_timed_table(points, tmp_path):
    pts = [{"setting": "r=1", "seed": s, "acc": {"fedavg": a}, "measures": {"steps_cv": 0.0},
            "seconds": 60.0} for s, a in ((0, 0.5), (1, 0.7))]
    (tmp_path / "out").mkdir()
    (tmp_path / "docs").mkdir()
    rows = points.write_tables(pts, tmp_path / "out", tmp_path / "docs", "spread", ["steps_cv"])
    assert [r["mean"] for r in rows] == [pytest.approx(0.6)]
    assert json.loads((tmp_path / "out" / "points.json").read_text())[1]["acc"] == {"fedavg": 0.7}
    md = (tmp_path / "docs" / "spread.md").read_text()
    assert md.startswith(points.timing_line(pts) + "\n\n| ") and "| r=1 | 0 | fedavg | 60.0 [" in md
    assert (tmp_path / "docs" / "spread.csv").read_text().startswith("setting,")


def test_issue16_tables_pair_every_model_with_each_reference_by_seed():
    tables = _load("issue16_tables")
    pts = [{"setting": "block", "seed": s, "acc": {"task_arithmetic": ta, "ties": ti, "learned-block": le},
            "within": {"learned-block": s == 0}, "measures": {}}
           for s, (ta, ti, le) in enumerate([(0.80, 0.85, 0.82), (0.81, 0.84, 0.83), (0.84, 0.85, 0.85)])]
    rows = {(r["reference"], r["model"]): r for r in tables.compare(pts, ["task_arithmetic", "ties"])}
    # learned - ties per seed: -0.03, -0.01, 0.00 -> mean -0.01333, sd 0.01528,
    # half-width t_{2, 0.975} (4.3027) * sd / sqrt(3)
    r = rows[("ties", "learned-block")]
    half = 4.302653 * math.sqrt(((-0.03 + 0.04 / 3) ** 2 + (-0.01 + 0.04 / 3) ** 2 + (0.04 / 3) ** 2) / 2) / math.sqrt(3)
    assert r["diff"] == pytest.approx(-0.04 / 3)
    assert r["diff_low"] == pytest.approx(-0.04 / 3 - half) and r["diff_high"] == pytest.approx(-0.04 / 3 + half)
    # the runs' own bootstrap marks are against Task Arithmetic: shown for that reference only
    assert rows[("task_arithmetic", "learned-block")]["within_seed"] == "1/3"
    assert rows[("ties", "learned-block")]["within_seed"] == ""


def test_issue16_plot_stars_only_what_survives_holm(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from scipy import stats as sps

    i16 = _load("issue16_tables")
    diffs = {"raw_only": (0.02, 0.03, 0.04), "strong": (0.10, 0.101, 0.102), "none": (0.0, 0.05, -0.05)}
    pts = [{"setting": "s", "seed": k, "acc": {"task_arithmetic": 0.5, **{m: 0.5 + d[k] for m, d in diffs.items()}},
            "measures": {}} for k in range(3)]
    rows = i16.compare(pts, ["task_arithmetic"])
    models = list(diffs)
    raw = [float(sps.ttest_1samp(diffs[m], 0.0).pvalue) for m in models]
    holm = dict(zip(models, holm_by_hand(raw)))
    assert raw[0] < 0.05 <= holm["raw_only"] and holm["strong"] < 0.05 <= holm["none"]
    by = {r["model"]: r for r in rows}
    assert by["raw_only"]["excludes_zero"]  # its raw interval excludes 0 ...
    assert by["raw_only"]["p_adjusted"] == pytest.approx(holm["raw_only"])
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    i16.plot(rows, tmp_path / "p.png", "t")
    ax = figs[0].axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    starred = [names[round(t.xy[0])] for t in ax.texts if t.get_text() == "*"]
    assert starred == ["strong"]  # ... but only the Holm survivor is starred
    assert "Holm" in ax.get_title()
    plt.close("all")


def test_readjust_recovers_the_per_seed_t_test_from_a_written_table(tmp_path):
    from scipy import stats as sps

    from fl_merge.io.results import read_rows, write_rows

    pts = _load("_points")
    ra = _load("readjust")
    diffs = {"m": (0.02, 0.05, 0.03), "n": (-0.01, 0.04, 0.0), "base": (-0.1, -0.15, -0.12)}
    pts_ = [{"setting": "s", "seed": k, "measures": {},
             "acc": {"ref": 0.6, **{m: 0.6 + d[k] for m, d in diffs.items()}}} for k in range(3)]
    # the table as the old experiments wrote it: intervals, no p-values
    old = [{k: v for k, v in r.items() if k not in ("p_value", "p_adjusted", "correction", "significant")}
           for r in pts.tabulate(pts_, "ref")]
    write_rows(tmp_path / "t.csv", old)
    rows = {r["model"]: r for r in ra.readjust(read_rows(tmp_path / "t.csv"))}
    raw = {m: float(sps.ttest_1samp(d, 0.0).pvalue) for m, d in diffs.items()}
    for m in diffs:
        assert rows[m]["p_value"] == pytest.approx(raw[m], rel=1e-9)
    assert rows["m"]["p_adjusted"] == pytest.approx(holm_by_hand([raw["m"], raw["n"]])[0])
    assert rows["base"]["p_adjusted"] == pytest.approx(raw["base"])  # its own family of one
