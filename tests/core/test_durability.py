"""Durability (issue 8, point 4): atomic writes survive SIGKILL, nothing is lost, a rerun
resumes from the cache.

A real writer process rewrites a run's results.csv, merged.safetensors and run.json, a
client-update cache entry and a sweep's results.csv (appended) through our own functions,
in a loop, each version self-describing (a version number, sizes and values derived from
it). The test SIGKILLs it mid-write, several times: right after the temporary file of the
target it picked appears (plus a random delay), or at a random moment. After every kill
each target must parse and be a complete version (the old one or the new one), every
appended sweep row of a completed append must be there, every cache entry saved before
the kill must load and verify. Stale temporary files must be ignored by readers and
removed by the next write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_merge.io.update_cache import entry_path, load_update, save_update
from fl_merge.core import files
from fl_merge.io import results
from fl_merge.io import store
from fl_merge.io.merged import merged_metadata_of

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
HERE = Path(__file__).resolve().parent  # the writer subprocess imports this module from here

# Sizes: a few MB per file, so a write takes long enough to be interrupted in its middle.
ROWS, BLOB = 40, 60_000
MODEL_NUMEL = 1 << 20
JSON_LEN = 150_000
CACHE_NUMEL = 1 << 19
CACHE_KEYS = 3
SWEEP_ROWS, SWEEP_SEED_ROWS = 10, 600
TARGETS = ("rows", "model", "json", "cache", "sweep")


# --------------------------------------------------------------------------- payloads

def rows_for(v: int) -> list[dict]:
    return [{"version": v, "i": i, "blob": "r" * (BLOB + v % 5)} for i in range(ROWS)]


def model_for(v: int):
    backbone = {"backbone.w": torch.full((MODEL_NUMEL,), float(v)),
                "backbone.b": torch.arange(1000, dtype=torch.float32) + v}
    heads = {"taskA": {"head.weight": torch.full((10, 8), float(-v))}}
    return backbone, heads, {"eta": v}  # the version rides in a metadata field merged files allow


def json_for(v: int) -> dict:
    return {"version": v, "data": list(range(JSON_LEN + v % 7))}


def cache_key(v: int) -> str:
    return f"key{v % CACHE_KEYS}"


def cache_for(v: int):
    return {"w": torch.full((CACHE_NUMEL,), float(v)), "b": torch.arange(7.0) * v}, {"version": v}


def sweep_rows_for(v: int) -> list[dict]:
    return [{"job": v, "run_dir": f"job{v}", "overrides": f"seed={v}", "config_hash": "h",
             "i": i, "blob": "s" * 1500} for i in range(SWEEP_ROWS)]


def paths(base: Path) -> dict[str, Path]:
    return {"rows": base / "run" / results.RESULTS_FILE, "model": base / "run" / results.MODEL_FILE,
            "json": base / "run" / results.RUN_FILE, "sweep": base / "sweep" / results.RESULTS_FILE,
            "cache": base / "cache" / "updates"}


def write(target: str, base: Path, v: int) -> None:
    p = paths(base)
    if target == "rows":
        results.write_rows(p["rows"], rows_for(v))
    elif target == "model":
        results.save_merged_model(p["model"], *model_for(v))
    elif target == "json":
        results.write_json(p["json"], json_for(v))
    elif target == "cache":
        save_update(cache_key(v), *cache_for(v), root=base / "cache")
    elif target == "sweep":
        store.append_rows(p["sweep"], sweep_rows_for(v))


def writer_main(base: str, start: int) -> None:
    """The writer process: versions start, start+1, ... of every target, round robin;
    prints '<target> <version>' once a write has returned."""
    base_path = Path(base)
    print("ready", flush=True)
    v = start
    while True:
        for target in TARGETS:
            write(target, base_path, v)
            print(target, v, flush=True)
        v += 1


# --------------------------------------------------------------------------- checks

def version_of(target: str, base: Path) -> int:
    """The complete version a target holds; fails on a partial or inconsistent file."""
    p = paths(base)
    if target == "rows":
        rows = results.read_rows(p["rows"])
        assert rows, "results.csv holds no rows: a partial write"
        v = rows[0]["version"]
        assert rows == rows_for(v)
        return v
    if target == "model":
        v = int(merged_metadata_of(p["model"])["eta"])
        t = load_file(str(p["model"]))
        backbone, heads, _ = model_for(v)
        expected = {**backbone, "heads.taskA.weight": heads["taskA"]["head.weight"]}
        assert set(t) == set(expected) and all(torch.equal(t[k], expected[k]) for k in t)
        return v
    if target == "json":
        data = json.loads(p["json"].read_text())
        assert data == json_for(data["version"])
        return data["version"]
    raise ValueError(target)


def check_sweep(base: Path, completed: list[int]) -> list[int]:
    """The sweep CSV holds the seed rows, then every completed append in order (at most one
    more: an append whose rename happened just before the kill), each one whole."""
    rows = results.read_rows(paths(base)["sweep"])
    jobs: dict[int, list[dict]] = {}
    for r in rows:
        jobs.setdefault(r["job"], []).append(r)
    assert len(jobs[-1]) == SWEEP_SEED_ROWS
    appended = [j for j in jobs if j != -1]
    assert appended[: len(completed)] == completed, "an acknowledged append was lost"
    assert len(appended) <= len(completed) + 1
    for j in appended:
        got = [{k: r[k] for k in ("job", "run_dir", "overrides", "config_hash", "i", "blob")}
               for r in jobs[j]]
        assert got == sweep_rows_for(j), f"append {j} is not whole"
    return appended


def check_cache(base: Path, saved: dict[str, int]) -> None:
    """Every key saved before the kill loads, verifies, and holds that save or a later
    one; nothing half-written sits under an entry's name."""
    for key, v_saved in saved.items():
        hit = load_update(key, base / "cache")
        assert hit is not None, f"cache entry {key} saved before the kill does not load"
        state, metrics = hit
        v = metrics["version"]
        assert v >= v_saved and cache_key(v) == key
        expected, _ = cache_for(v)
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    for f in (base / "cache" / "updates").glob("*.safetensors"):
        assert load_update(f.stem, base / "cache") is not None, f"{f.name} is not a valid entry"


def temps(base: Path) -> list[Path]:
    return sorted(p for d in ("run", "sweep", "cache/updates") if (base / d).is_dir()
                  for p in (base / d).iterdir() if files.is_temp(p.name))


def _temp_target(path: Path, base: Path) -> str:
    """Which target a temporary file was being written for."""
    if path.parent.name == "updates":
        return "cache"
    if path.parent == base / "sweep":
        return "sweep"
    return {results.RESULTS_FILE: "rows", results.MODEL_FILE: "model",
            results.RUN_FILE: "json"}[path.name[1:].split(".tmp")[0]]


def _of(pid: int, path: Path) -> bool:
    return f"-{pid}-" in path.name


# --------------------------------------------------------------------------- the kill test

def _start_writer(base: Path, start: int) -> subprocess.Popen:
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(HERE)!r}]; "
            f"from test_durability import writer_main; writer_main({str(base)!r}, {start})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _wait_for_temp(base: Path, target: str, pid: int, timeout: float = 30.0) -> bool:
    """Poll until writer `pid`'s temporary file for `target` exists."""
    d = paths(base)[target] if target == "cache" else paths(base)[target].parent
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for entry in os.scandir(d):
                path = Path(entry.path)
                if files.is_temp(entry.name) and _of(pid, path) and _temp_target(path, base) == target:
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    return False


# A kill timed inside a write can still miss it (the write finished first, more often on a
# loaded machine): retry up to this many times per target before calling it a failure.
MAX_KILL_ATTEMPTS = 10


def test_sigkill_mid_write_leaves_old_or_new_file_and_loses_nothing(tmp_path):
    rng = random.Random(8)
    base = tmp_path
    # Version 0 of everything, and a sweep that already holds earlier jobs' rows.
    for target in ("rows", "model", "json", "cache"):
        write(target, base, 0)
    store.append_rows(paths(base)["sweep"],
                      [{**sweep_rows_for(-1)[0], "i": i} for i in range(SWEEP_SEED_ROWS)])
    known = {t: 0 for t in ("rows", "model", "json")}
    saved = {cache_key(0): 0}
    appended: list[int] = []
    killed_mid_write = {t: 0 for t in TARGETS}
    start = 1
    # Kills at random moments, and for each target kills timed inside its write (retried,
    # up to MAX_KILL_ATTEMPTS times, until one lands before the rename: the write may just
    # have finished).
    plan = [None, None, *TARGETS]
    rng.shuffle(plan)
    attempts = {t: 0 for t in TARGETS}
    while plan:
        target = plan.pop()
        proc = _start_writer(base, start)
        if target is None:
            time.sleep(rng.uniform(0.0, 0.6))
        else:
            assert _wait_for_temp(base, target, proc.pid), f"the writer never wrote {target}"
            time.sleep(rng.uniform(0.0, 0.002))
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        done: dict[str, list[int]] = {}
        for line in out.splitlines():
            t, v = line.split()
            done.setdefault(t, []).append(int(v))
        # Whole-file targets: the last acknowledged version, or the one being written.
        for t, before in known.items():
            prev = done[t][-1] if t in done else before
            nxt = prev + 1 if t in done else start
            v = version_of(t, base)
            assert v in (prev, nxt), (t, v, prev, nxt)
            known[t] = v
        for v in done.get("cache", []):
            saved[cache_key(v)] = v
        check_cache(base, saved)
        appended += done.get("sweep", [])
        appended = check_sweep(base, appended)
        # Which writes did the kill interrupt? (a temporary file was left behind)
        left = {_temp_target(p, base) for p in temps(base) if _of(proc.pid, p)}
        assert len(left) <= 1  # one write at a time
        if target is not None:
            attempts[target] += 1
            if target in left:
                killed_mid_write[target] += 1
            elif attempts[target] < MAX_KILL_ATTEMPTS:
                plan.append(target)
        start += 1000
    # The kills did land inside the writes being tested, for every target.
    assert all(killed_mid_write.values()), killed_mid_write

    # Readers never pick up the dead writers' temporary files...
    stale = temps(base)
    assert stale
    run_rows = store.load_sweep(base / "run")
    assert len(run_rows) == ROWS and {r["version"] for r in run_rows} == {known["rows"]}
    sweep = store.load_sweep(base / "sweep")
    assert len(sweep) == SWEEP_SEED_ROWS + SWEEP_ROWS * len(appended)
    # ...and the next write to the same directory removes them.
    for target in ("rows", "model", "json", "cache"):
        write(target, base, 10**6)
    store.append_rows(paths(base)["sweep"], sweep_rows_for(10**6))
    assert temps(base) == []
    assert version_of("rows", base) == version_of("model", base) == version_of("json", base) == 10**6
    check_sweep(base, [*appended, 10**6])


# --------------------------------------------------------------------------- temp files

def test_only_dead_writers_temporary_files_are_removed(tmp_path):
    target = tmp_path / results.RESULTS_FILE
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        host = files._HOST
        mine = tmp_path / f".{target.name}.tmp-{host}-{os.getpid()}-aa"       # in progress, us
        live = tmp_path / f".{target.name}.tmp-{host}-{sleeper.pid}-bb"       # another live writer
        gone = tmp_path / f".{target.name}.tmp-{host}-{dead.pid}-cc"          # killed writer
        legacy = tmp_path / f".report.png.tmp{dead.pid}"                       # older naming
        remote = tmp_path / f".{target.name}.tmp-otherhost-{os.getpid()}-dd"  # another host
        remote_old = tmp_path / f".{target.name}.tmp-otherhost-1-ee"
        other = [tmp_path / ".results.csv.lock", tmp_path / "notes.tmp1", tmp_path / "x.csv"]
        for p in (mine, live, gone, legacy, remote, remote_old, *other):
            p.write_text("partial")
        hour_ago = time.time() - files.STALE_TEMP_SECONDS - 60
        os.utime(remote_old, (hour_ago, hour_ago))
        results.write_rows(target, [{"a": 1}])
        left = {p.name for p in tmp_path.iterdir()}
        assert {mine.name, live.name, remote.name} <= left
        assert not {gone.name, legacy.name, remote_old.name} & left
        assert {p.name for p in other} <= left  # not temporary files: untouched
        assert results.read_rows(target) == [{"a": 1}]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_temporary_file_is_never_taken_for_a_cache_entry(tmp_path):
    """A complete entry written under a temporary name (the writer died before the
    rename) is not an entry: the key is a miss until a real save."""
    key = "k" * 32
    path = save_update(key, {"w": torch.ones(3)}, {"m": 1}, root=tmp_path)
    tmp = path.with_name(f".{path.name}.tmp-{files._HOST}-999999999-ab")
    os.replace(path, tmp)
    assert files.is_temp(tmp.name)
    assert load_update(key, tmp_path) is None
    assert list((tmp_path / "updates").glob("*.safetensors")) == []
    save_update(key, {"w": torch.zeros(3)}, {"m": 2}, root=tmp_path)
    state, metrics = load_update(key, tmp_path)
    assert metrics == {"m": 2} and torch.equal(state["w"], torch.zeros(3))
    assert not tmp.exists()  # the dead writer's temporary file went with the next write


def test_an_empty_or_truncated_entry_is_rebuilt_not_used(tmp_path):
    """What a crash without fsync could leave under the final name: never returned."""
    key = "e" * 32
    path = save_update(key, {"w": torch.arange(1000.0)}, {"m": 1}, root=tmp_path)
    whole = path.read_bytes()
    for broken in (b"", whole[:8], whole[: len(whole) // 2], whole[:-4] + b"\0\0\0\0"):
        path.write_bytes(broken)
        assert load_update(key, tmp_path) is None and not path.exists()


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / results.RUN_FILE
    results.write_json(target, {"v": 1})

    class Unserializable:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        results.write_json(target, {"v": Unserializable()})

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"v": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """The data reaches the disk before the rename publishes it, and the rename is synced
    too: a power cut cannot leave an empty file under the final name."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for write_one in (lambda: results.write_rows(tmp_path / "r.csv", [{"a": 1}]),
                      lambda: results.write_json(tmp_path / "r.json", {"a": 1}),
                      lambda: results.save_merged_model(tmp_path / "m.safetensors",
                                                        {"w": torch.ones(2)}, {}, {}),
                      lambda: save_update("f" * 32, {"w": torch.ones(2)}, {}, root=tmp_path),
                      lambda: store.append_rows(tmp_path / "s.csv", [{"a": 1}])):
        events.clear()
        write_one()
        assert events == ["fsync-file", "replace", "fsync-dir"], events


def test_the_one_csv_writer_puts_given_columns_first_and_leaves_missing_cells_empty(tmp_path):
    path = results.write_rows(tmp_path / "t.csv", [{"b": 1, "c": "x,y"}, {"d": True}],
                              extra={"run": 7}, columns=["a", "b"])
    # written out by hand: RFC 4180 quoting, csv's \r\n line ends, header a, b, then the rest
    assert path.read_bytes() == (b"a,b,run,c,d\r\n"
                                 b',1,7,"x,y",\r\n'
                                 b",,7,,True\r\n")


def test_appending_to_the_store_keeps_old_columns_and_adds_new_ones_at_the_end(tmp_path):
    path = tmp_path / "s.csv"
    store.append_rows(path, [{"job": 0, "acc": 0.5}])
    store.append_rows(path, [{"job": 1, "loss": 2}])
    assert path.read_bytes() == b"job,acc,loss\r\n0,0.5,\r\n1,,2\r\n"


# --------------------------------------------------------------------------- resume

CLIENT_CONFIG = {"model": "mnist-cnn", "tasks": ["parity", "invert", "rotate90", "blur"],
                 "data-seed": 0, "data": "tasks", "local-steps": 5, "lr": 0.01, "batch-size": 32,
                 "seed": [0, 1, 2, 3], "cache": True}

_TRAIN_ALL = """
import sys
from pathlib import Path
from fl_merge_clients.client_app import local_train
from fl_merge.models.registry import PretrainConfig, pretrained_backbone
from fl_merge.config.run_config import RunConfig
cfg = RunConfig()
theta0 = pretrained_backbone(cfg.model, PretrainConfig(steps=cfg.pretrain_steps,
                                                       seed=cfg.pretrain_seed), progress=False)
config = {config!r}
for pid in range(4):
    local_train(config, pid, theta0, Path({cache!r}))
    print("trained", pid, flush=True)
"""


def test_rerun_after_a_kill_resumes_from_the_cache(theta0, tmp_path, counted_trainer):
    """Clients killed part way through: on the rerun, every client whose update was cached
    before the kill is served from the cache (no training), the others train."""
    from fl_merge_clients import client_app

    cache = tmp_path / "cache"
    code = _TRAIN_ALL.format(config=CLIENT_CONFIG, cache=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().split() == ["trained", "0"], proc.stderr.read()
        assert proc.stdout.readline().split() == ["trained", "1"], proc.stderr.read()
        time.sleep(random.Random(4).uniform(0.0, 0.3))  # somewhere in client 2 (or 3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finished = 2 + out.count("trained")
    entries = sorted((cache / "updates").glob("*.safetensors"))
    assert len(entries) >= min(finished, 4)
    assert all(load_update(e.stem, cache) is not None for e in entries)  # none is partial

    calls = counted_trainer  # counts only the trainings below: the ones above ran in a child
    cached = [client_app.local_train(CLIENT_CONFIG, pid, theta0, cache)[1]["cached"]
              for pid in range(4)]
    assert cached[:2] == [1, 1]  # trained before the kill: reused
    assert sum(cached) == len(entries) and len(calls) == 4 - len(entries)
    assert temps_in(cache / "updates") == []  # the killed writer's temp, if any, is gone
    assert len(list((cache / "updates").glob("*.safetensors"))) == 4


def temps_in(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if files.is_temp(p.name)]


def test_entry_paths_are_not_temporary_names():
    assert not files.is_temp(entry_path("a" * 32).name)
    assert not files.is_temp(results.RESULTS_FILE)
    assert files.is_temp(files.temp_path(Path("/x") / results.MODEL_FILE).name)
