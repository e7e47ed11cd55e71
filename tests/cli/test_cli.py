"""`fl-merge` (fl_merge/cli.py): Hydra config tree -> RunConfig mapping, up-front validation,
real runs and sweeps through Flower's simulation engine, the sweep store and the report.

Each Flower simulation costs ~10-30 s of Ray start-up on 2 cores, so the real invocations
are few and shared: one single run, one 2-job multirun and a 1-job repeat of it (module-scoped fixture).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from fl_merge import cli

from fl_merge.io import store
from fl_merge.cli import schema
from fl_merge.methods import available_methods, get_method
from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.io.results import read_rows

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def composed(*overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def flower(*overrides: str) -> dict:
    return cli.to_flower(composed(*overrides))[0]


# --------------------------------------------------------------------------- mapping (fast)

def test_default_composition_is_runconfig_defaults():
    mapped, options = cli.to_flower(composed())
    # Only selections are set; everything else comes from RunConfig's own defaults.
    assert mapped == {"model": "mnist-cnn", "data": "tasks", "method": "task_arithmetic"}
    assert options == {}
    assert RunConfig.from_flower(mapped) == RunConfig()


def test_flat_method_override_maps_to_method_params():
    assert flower("method=ties") == {**flower(), "method": "ties"}  # default density: not passed
    mapped = flower("method=ties", "method.density=0.3")
    assert mapped["method"] == "ties" and mapped["method-params"] == "ties.density=0.3"
    cfg = RunConfig.from_flower(mapped).resolve()
    assert cfg.methods == [("ties", {"density": 0.3})]


def test_several_methods_in_one_run_and_lists():
    mapped = flower("method=ties", "method.name=[fedavg,ties,median]", "method.density=0.5",
                    "eval.etas=[0.5,1,2]", "training.local_steps=[10,20,30,40]")
    assert mapped["method"] == "fedavg,ties,median"
    assert mapped["method-params"] == "ties.density=0.5"
    assert mapped["etas"] == "0.5,1,2" and mapped["local-steps"] == "10,20,30,40"
    cfg = RunConfig.from_flower(mapped).resolve()
    assert [m for m, _ in cfg.methods] == ["fedavg", "ties", "median"]
    assert cfg.local_steps == [10, 20, 30, 40] and cfg.etas == [0.0, 0.5, 1.0, 2.0]


def test_groups_map_onto_runconfig_fields():
    mapped = flower("data=dirichlet", "data.alpha=0.1", "num_clients=8", "seed=3",
                    "training=step_spread", "eval=num_examples", "runtime.device=cpu",
                    "runtime.num_supernodes=10", "runtime.cache=false")
    assert mapped == {"model": "mnist-cnn", "data": "dirichlet", "alpha": 0.1, "num-clients": 8,
                      "seed": 3, "local-steps": "50..300", "weighting": "num-examples",
                      "device": "cpu", "cache": False, "method": "task_arithmetic"}
    assert cli.to_flower(composed("runtime.num_supernodes=10"))[1] == {"num_supernodes": 10}
    run = RunConfig.from_flower(mapped)
    assert run.alpha == 0.1 and run.partition_task == RunConfig().partition_task
    run.resolve()


def _yaml_files():
    return sorted(CONFIGS.rglob("*.yaml"))


def _leaves(node, prefix=""):
    for key, value in node.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _group_and_key(path, leaf: str) -> tuple[str | None, str]:
    """A leaf's config group and key. A `# @package _global_` file (experiment presets) sets
    root paths: its first component names the group (data.suite -> data, suite)."""
    if path.read_text().startswith("# @package _global_"):
        head, _, rest = leaf.partition(".")
        return (head, rest) if rest else (None, head)
    return (path.parent.name if path.parent != CONFIGS else None), leaf


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_leaf_maps_onto_a_runconfig_field_or_method_param(path):
    fields = cli.run_config_fields()
    params = {p for m in available_methods() for p in get_method(m).params}
    for leaf, _ in _leaves(yaml.safe_load(path.read_text()) or {}):
        group, key = _group_and_key(path, leaf)
        full = f"{group}.{key}" if group else key
        if full in cli.CLI_OPTIONS:
            continue
        if key == "name":
            assert group in cli.GROUP_FIELDS, f"{path}: 'name' in a group without a name field"
        elif group == "method":
            assert key in get_method(path.stem).params and key in params
        else:
            assert key in fields, f"{path}: '{key}' is no RunConfig field"


def test_default_composition_values_equal_runconfig_defaults():
    """Wherever a yaml in the default composition sets a value (not null) that RunConfig
    also has a default for, the two agree: the yaml tree cannot drift from RunConfig."""
    defaults = RunConfig().to_flower()
    root = yaml.safe_load((CONFIGS / "config.yaml").read_text())
    files = [(None, CONFIGS / "config.yaml")]
    for entry in root["defaults"]:
        if isinstance(entry, dict):
            (group, choice), = entry.items()
            files.append((group, CONFIGS / group / f"{choice}.yaml"))
    # method/<name> is derived from the registry (ConfigStore), not a yaml file.
    assert composed().method.name == defaults["method"]
    files = [(g, p) for g, p in files if g != "method"]
    checked = 1
    for group, path in files:
        for key, value in _leaves(yaml.safe_load(path.read_text())):
            if value is None or (group == "method" and key != "name"):
                continue  # unset; method params are checked against the registry
            name = cli.GROUP_FIELDS.get(group, key) if key == "name" else key
            dashed = name.replace("_", "-")
            if dashed in defaults:
                assert value == defaults[dashed], f"{path}: {key}={value!r} but RunConfig has {defaults[dashed]!r}"
                checked += 1
    assert checked >= 3  # at least the selections: model, data and method


def test_every_runconfig_field_is_reachable():
    cfg = composed()
    reachable = set(cli.GROUP_FIELDS.values()) | {"method_params"}  # method.* params
    for key, _ in _leaves(yaml.safe_load((CONFIGS / "config.yaml").read_text())):
        reachable.add(key)
    for group in ("model", "data", "training", "eval", "runtime", "attack"):
        for path in (CONFIGS / group).glob("*.yaml"):
            reachable |= {k for k, _ in _leaves(yaml.safe_load(path.read_text()))}
    for group in schema.GROUP_KEYS:  # <group>/_schema, in ConfigStore
        reachable |= {f.name for f in dataclasses.fields(schema.group_schema(group))}
    assert cli.run_config_fields() <= reachable
    assert cfg.method.name == RunConfig().method


def test_sweep_expands_like_hydra_and_is_validated_up_front():
    jobs = cli.expand(["method=fedavg,ties", "data=dirichlet", "data.alpha=0.1,1.0", "seed=0,1"], True)
    assert len(jobs) == 8 and jobs[0] == ["method=fedavg", "data=dirichlet", "data.alpha=0.1", "seed=0"]
    planned = cli.plan(["method=fedavg,ties", "data=dirichlet", "data.alpha=0.1,1.0"], True)
    assert [j.run.alpha for j in planned] == [0.1, 1.0, 0.1, 1.0]
    # krum's f is searched over what K allows with search=paper (f=0 for K=4); fixed f=1 is refused
    with pytest.raises(ConfigError, match=r"job \[method=krum search=off\]: Krum with f=1 needs"):
        cli.plan(["method=fedavg,krum", "search=off"], True)
    with pytest.raises(ConfigError, match="is a sweep: add -m"):
        cli.plan(["seed=0,1"], False)


@pytest.mark.parametrize("argv, message", [
    (["method=nope"], "Could not find 'method/nope'; available options in 'method': breadcrumbs"),
    (["data.alpha=0.1"], "Could not override 'data.alpha'"),
    (["lamdas=[0.1,0.3]"], "Could not override 'lamdas': the composed config has no such key (did you mean 'lambdas'?)"),
    (["method=ties", "method.densty=0.3"], "(did you mean 'method.density'?)"),
    (["+lamdas=0.3"], "RunConfig has no field 'lamdas') (did you mean 'lambdas'?)"),
    (["num_clients=9"], "num-clients=9 but only 8 tasks"),
    (["method=ties", "method.density=2"], "density"),
    (["-m", "method=fedavg,krum", "search=off"], "job [method=krum search=off]"),
    (["runtime.num_supernodes=1"], "runtime.num_supernodes=1 must be"),
    (["runtime.client_gpus=-1"], "runtime.client_gpus=-1 must be a number >= 0"),
    (["method=fedgma", "method.name=[fedavg]", "method.rho=0.7"], "method.rho=0.7: none of the methods"),
])
def test_bad_config_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("fl-merge: error: ") and err.count("\n") == 1
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_client_gpus_reach_flower_client_resources_only_with_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="runtime.client_gpus=0.25 but torch sees no CUDA GPU"):
        cli.build_job(composed("runtime.client_gpus=0.25"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.build_job(composed("runtime.client_gpus=0.25")).client_gpus == 0.25
    assert cli.build_job(composed()).client_gpus == 0.0


def test_bad_config_through_the_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fl_merge", "method=nope"], check=False, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "method/nope" in proc.stderr


# --------------------------------------------------------------------------- store (fast)

def _append_many(path: str, worker: int) -> None:
    for i in range(10):
        store.append_rows(path, [{"worker": worker, "i": i, f"col{worker}": "x"}])


def test_append_rows_is_atomic_and_locked(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = read_rows(path)
    assert sorted((r["worker"], r["i"]) for r in rows) == [(w, i) for w in range(3) for i in range(10)]
    assert {"col0", "col1", "col2"} <= set(rows[0])  # columns are the union
    # Interrupted between writing the temp file and the rename: the old file stays whole.
    before = path.read_text()

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.append_rows(path, [{"worker": 9, "i": 0}])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# --------------------------------------------------------------------------- real runs

TINY = ["num_clients=2", "eval.etas=1"]


def _fl_merge(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl_merge", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fl-merge-cache")
    return {**os.environ, "FL_MERGE_CACHE": str(cache)}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, env):
    """A 2-job multirun (methods fedavg and median; same training), then its first job again
    as a multirun of one (a second 2-job sweep checked nothing more and cost a Flower run)."""
    base = tmp_path_factory.mktemp("sweeps")
    args = [*TINY, "training.local_steps=15"]
    out = []
    for name, methods in (("first", "fedavg,median"), ("second", "fedavg")):
        proc = _fl_merge(["-m", f"method={methods}", *args, f"hydra.sweep.dir={base / name}"], base, env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out.append((base / name, proc))
    return out


def test_single_run_that_lost_a_client_names_it_last_and_exits_3(tmp_path, env):
    """One Hydra run (ties, density 0.3) in which client 1's update is NaN (one Flower
    simulation for both checks, each costs ~20 s): the run finishes with the other client,
    writes its outputs, keeps the WARNING, and its last lines say which task was lost and
    why; exit 3, since min-clients (0) did not allow losses (the allowance itself:
    tests/round/test_failures.py)."""
    run_dir = tmp_path / "run"
    # local_steps=10: its own client updates in the module's cache (the sweeps below train 15)
    proc = _fl_merge(["method=ties", "method.density=0.3", *TINY, "training.local_steps=10",
                      "attack.faults=nan@1", f"hydra.run.dir={run_dir}"], tmp_path, env)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ties (eta=1)" in proc.stdout and "normalized" in proc.stdout
    assert "WARNING" in proc.stdout + proc.stderr and f"results: {run_dir}" in proc.stdout
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["methods"]["ties"]["params"] == {"density": 0.3, "convention": "fl-merge"}
    assert meta["config"]["num-clients"] == 2 and meta["config"]["output-dir"] == str(run_dir)
    assert meta["missing_tasks"] == ["invert"]
    assert {r["task"] for r in read_rows(run_dir / "results.csv")} == {"rotate90"}
    assert (run_dir / "merged.safetensors").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    last = proc.stderr.strip().splitlines()[-2:]
    assert last[0] == ("fl-merge: the results lost 1 of 2 clients; exit status 3 (to accept a run "
                       "that keeps at least 1, set min-clients=1)")
    assert re.fullmatch(r"fl-merge: task invert, node \d+ \(partition 1\), lost at train: non-finite "
                        r"update in backbone\.\S+; not merged, no results", last[1]), last[1]


def test_multirun_appends_tidy_rows_to_one_sweep_file(sweeps):
    sweep_dir, proc = sweeps[0]
    rows = read_rows(sweep_dir / "results.csv")
    assert {r["job"] for r in rows} == {0, 1}
    assert {r["ov:method"] for r in rows} == {"fedavg", "median"}
    assert {r["method"] for r in rows} == {"fedavg", "median"}
    assert all(r["overrides"].startswith(f"method={r['ov:method']} num_clients=2") for r in rows)
    hashes = {r["job"]: r["config_hash"] for r in rows}
    assert len(set(hashes.values())) == 2  # the method is part of the setting's identity
    for job in (0, 1):
        assert len(read_rows(sweep_dir / str(job) / "results.csv")) == \
            len([r for r in rows if r["job"] == job])
    assert "results.csv" in proc.stdout and "fl-merge report" in proc.stdout


def _cached(sweep_dir: Path, job: int) -> list[int]:
    meta = json.loads((sweep_dir / str(job) / "run.json").read_text())
    return [int(c["cached"]) for c in meta["clients"]]


def test_jobs_differing_only_in_method_reuse_client_updates(sweeps):
    first, _ = sweeps[0]
    assert _cached(first, 0) == [0, 0]  # trained
    assert _cached(first, 1) == [1, 1]  # same training config, other method: reused


def test_the_median_job_says_it_is_fedavg_at_k2_and_its_phase_lines_count_seconds(sweeps):
    first, _ = sweeps[0]
    median_job = first / "1"  # method=fedavg,median: job 1 is median, on num_clients=2
    notes = json.loads((median_job / "run.json").read_text())["notes"]
    assert any(n.startswith("median = fedavg by construction at K=2") for n in notes), notes
    log = (median_job / "run.log").read_text()
    assert re.search(r"fl-merge phase test starts [0-9.]+ s into the round \(validation took", log), log[-3000:]
    assert not re.search(r"fl-merge phase \w+ t=\d", log)  # no raw epoch timestamps


def test_second_invocation_trains_nothing(sweeps):
    second, proc = sweeps[1]
    assert _cached(second, 0) == [1, 1] and not (second / "1").exists()
    assert proc.stdout.count("2/2 clients cached") == 1
    # (The ServerApp's "N of K clients reused a cached update" log line left with main's
    # strategy rewrite; run.json's per-client `cached` above is the record.)
    assert (second / "0" / "run.log").stat().st_size > 0
    # Same settings, same results (job 0 of each sweep: fedavg).
    a, b = ([r for r in read_rows(d / "results.csv") if r["job"] == 0] for d, _ in sweeps)
    def by_key(rows):
        return {(r["job"], r["task"], r["model"], str(r["eta"]), r["split"]): r["accuracy"] for r in rows}

    assert by_key(a) == by_key(b)


def test_ctrl_c_mid_sweep_keeps_completed_jobs(sweeps, tmp_path, env):
    """SIGINT (Ctrl-C) once job 0 has landed: exit 130, job 0's rows intact and readable,
    nothing half-written. Same training as `sweeps`, so every job starts from the cache."""
    import signal
    import time

    sweep_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fl_merge", "-m", "method=fedavg,median,trimmed_mean", *TINY,
         "training.local_steps=15", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # A background shell (`make test &`, nohup) starts us with SIGINT ignored, which the
        # child would inherit; a terminal's Ctrl-C reaches a process with the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not (sweep_dir / "results.csv").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "job 0 never finished"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    rows = read_rows(sweep_dir / "results.csv")
    assert {r["job"] for r in rows} == {0} and {r["method"] for r in rows} == {"fedavg"}
    job0 = read_rows(sweep_dir / "0" / "results.csv")
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in job0]
    assert not [p for p in sweep_dir.rglob("*") if ".tmp" in p.name]
    assert not (sweep_dir / "2").exists()  # the sweep stopped


def test_report_prints_best_settings_and_writes_plots(sweeps, capsys):
    sweep_dir, _ = sweeps[0]
    assert cli.main(["report", str(sweep_dir)]) == 0
    printed = capsys.readouterr().out
    assert "best setting per method" in printed
    assert "fedavg" in printed and "median" in printed and "all with: num_clients=2" in printed
    report = sweep_dir / "report"
    for name in ("accuracy_vs_eta.png", "method_setting_heatmap.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(report / "best.csv", newline="") as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"fedavg", "median"}


def test_multirun_through_another_hydra_launcher(sweeps, tmp_path, env):
    """`hydra/launcher=joblib` needs no code change: Hydra's own sweeper hands the jobs to
    the joblib launcher (its worker processes run the same task function), every job's
    rows land in the sweep store and the summary is read back from it. Skipped where
    hydra-joblib-launcher is not installed (it is not a dependency)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "joblib"
    proc = _fl_merge(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=fedavg,median",
                      *TINY, "training.local_steps=15", f"hydra.sweep.dir={sweep_dir}"], tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Joblib" in proc.stdout + proc.stderr  # Hydra's joblib launcher ran the jobs
    rows = read_rows(sweep_dir / "results.csv")
    assert {r["job"] for r in rows} == {0, 1} and {r["method"] for r in rows} == {"fedavg", "median"}
    assert "2 job(s)" in proc.stdout and "fl-merge report" in proc.stdout
    first = read_rows(sweeps[0][0] / "results.csv")  # same settings as `sweeps`: same numbers

    def by_key(rows):
        return {(r["method"], r["task"], r["model"], str(r["eta"]), r["split"]): r["accuracy"] for r in rows}

    assert by_key(rows) == by_key(first)
