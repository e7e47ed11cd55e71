"""`fl-merge merge` (fl_merge.cli.merge / file_merge / checkpoints) on small checkpoints the
tests write in every accepted format. References are computed here with plain torch from
the tensors the test made (Task Arithmetic, median), or, for methods with no short closed
form, with fl_merge.merge on the in-memory task vectors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.merging.registry import check_method_params
from fl_merge.merging.scales import eta_for_lambda
from fl_merge.methods import available_methods, get_method, merge
from fl_merge.core.safetensors_writer import plan_shards
from fl_merge.io.checkpoints import Checkpoint, parse_size
from fl_merge.io.file_merge import method_scope, model_names
from fl_merge.cli.merge import main

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"enc.weight": (6, 5), "enc.bias": (6,), "head.weight": (3, 6), "scalar": ()}


def make_pool(k=3, dtype=torch.float32, seed=0):
    """theta0 and k fine-tuned state dicts (plus an int buffer equal everywhere)."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}
    base["bn.num_batches_tracked"] = torch.tensor(7)
    models = []
    for _ in range(k):
        m = {n: (v.float() + 0.5 * torch.randn(v.shape, generator=g)).to(dtype)
             for n, v in base.items() if v.is_floating_point()}
        m["bn.num_batches_tracked"] = torch.tensor(7)
        models.append(m)
    return base, models


def save_sharded(sd, folder: Path):
    """A sharded folder as Hugging Face writes it: two shards and model.safetensors.index.json."""
    folder.mkdir(parents=True)
    keys = list(sd)
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def write_pool(tmp: Path, base, models):
    """base as a plain file; models as a file, a sharded folder and an HF folder (cycled)."""
    save_file(base, str(tmp / "base.safetensors"))
    paths = []
    for i, m in enumerate(models):
        if i % 3 == 0:
            p = tmp / f"m{i}.safetensors"
            save_file(m, str(p))
        elif i % 3 == 1:
            p = tmp / f"m{i}_sharded"
            save_sharded(m, p)
        else:
            p = tmp / f"m{i}_hf"
            p.mkdir()
            save_file(m, str(p / "model.safetensors"))
        paths.append(str(p))
    return str(tmp / "base.safetensors"), paths


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def merged_file(pool, capsys, *args, count=None):
    """`fl-merge merge` of the pool's base and models (the first `count`) with `args`; the
    merged tensors."""
    tmp, _, _, b, ms = pool
    ms = ms[:count]
    out = tmp / "out.safetensors"
    assert run(["--base", b, "--models", *ms, *args, "--out", out], capsys)[0] == 0
    return load_file(str(out))


@pytest.fixture
def pool(tmp_path):
    base, models = make_pool()
    b, ms = write_pool(tmp_path, base, models)
    return tmp_path, base, models, b, ms


def test_task_arithmetic_equals_theta0_plus_lambda_sum_over_every_format(pool):
    tmp, base, models, b, ms = pool
    out = tmp / "out.safetensors"
    lam = 0.3
    # `fl-merge merge` as a user runs it (python -m fl_merge is the fl-merge entry point), from /tmp
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fl_merge", "merge", "--base", b, "--models", *ms,
                           "--method", "task_arithmetic", "--lambda", str(lam), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd="/tmp")
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(out))
    for n in SHAPES:
        by_hand = base[n] + lam * sum(m[n] - base[n] for m in models)  # Ilharco et al. 2023
        torch.testing.assert_close(got[n], by_hand)
    assert torch.equal(got["bn.num_batches_tracked"], torch.tensor(7))


@pytest.mark.parametrize("weights", [None, [1, 2, 1]])
def test_fedavg_with_a_given_lambda_is_task_arithmetic(pool, capsys, weights):
    """Issue 14's done-when: `--method fedavg --lambda L` writes Task Arithmetic's model
    theta0 + L * sum_i tau_i (uniform), the same tensors as `--method task_arithmetic`; with
    weights p_i both are theta0 + K * L * sum_i p_i tau_i."""
    tmp, base, models, b, ms = pool
    lam, k = 0.3, len(models)
    p = [1 / k] * k if weights is None else [w / sum(weights) for w in weights]
    got = {}
    for method in ("fedavg", "task_arithmetic"):
        out = tmp / f"{method}.safetensors"
        extra = [] if weights is None else ["--weights", *weights]
        assert run(["--base", b, "--models", *ms, "--method", method, "--lambda", lam, *extra,
                    "--out", out], capsys)[0] == 0
        got[method] = load_file(str(out))
    for n in SHAPES:
        by_hand = base[n] + k * lam * sum(pi * (m[n] - base[n]) for pi, m in zip(p, models))
        torch.testing.assert_close(got["fedavg"][n], by_hand)
        assert torch.equal(got["fedavg"][n], got["task_arithmetic"][n])


def test_eta_is_the_scale_of_the_mean_update(pool, capsys):
    _, base, models, _, _ = pool
    got = merged_file(pool, capsys, "--method", "fedavg", "--eta", 0.5)
    for n in SHAPES:
        torch.testing.assert_close(got[n], base[n] + 0.5 * sum(m[n] - base[n] for m in models) / 3)


def test_weights_make_a_weighted_mean(pool, capsys):
    _, base, models, _, _ = pool
    got = merged_file(pool, capsys, "--method", "fedavg", "--weights", 1, 2, 1, "--eta", 2.0)
    for n in SHAPES:
        mean = (1 * (models[0][n] - base[n]) + 2 * (models[1][n] - base[n]) + (models[2][n] - base[n])) / 4
        torch.testing.assert_close(got[n], base[n] + 2.0 * mean)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_kept_and_computed_in_float32(tmp_path, capsys, dtype):
    base, models = make_pool(dtype=dtype)
    b, ms = write_pool(tmp_path, base, models)
    out = tmp_path / "out.safetensors"
    assert run(["--base", b, "--models", *ms, "--method", "task_arithmetic", "--lambda", 0.3,
                "--out", out], capsys)[0] == 0
    got = load_file(str(out))
    for n in SHAPES:
        assert got[n].dtype == dtype
        ref = (base[n].float() + 0.3 * sum(m[n].float() - base[n].float() for m in models)).to(dtype)
        # at most one unit in the last place of the half type apart (float32 rounding order)
        ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(1.0)
        assert bool(((got[n].float() - ref.float()).abs() <= ulp).all())
    # and --dtype asks for another one
    out32 = tmp_path / "out32.safetensors"
    assert run(["--base", b, "--models", *ms, "--method", "task_arithmetic", "--lambda", 0.3,
                "--out", out32, "--dtype", "float32"], capsys)[0] == 0
    got32 = load_file(str(out32))
    n = "enc.weight"
    assert got32[n].dtype == torch.float32
    torch.testing.assert_close(got32[n], base[n].float() + 0.3 * sum(m[n].float() - base[n].float()
                                                                       for m in models))


def test_median_equals_the_middle_task_vector(pool, capsys):
    _, base, models, _, _ = pool
    got = merged_file(pool, capsys, "--method", "median", "--eta", 1.0)
    for n in SHAPES:
        sorted_taus = torch.stack([m[n] - base[n] for m in models]).sort(0).values
        torch.testing.assert_close(got[n], base[n] + sorted_taus[1])  # K = 3: the middle one


def _needs_steps(method: str) -> bool:
    """The method declares it needs each client's local steps or FedNova normalisers."""
    needs = get_method(method).needs
    return needs.local_steps or needs.normalisers


def _taus(base, models, keys=SHAPES):
    return [{n: m[n] - base[n] for n in keys} for m in models]


def _count(method, k=3):
    """k, or 2 for a method defined on exactly two models (slerp)."""
    def runs(n):
        try:
            check_method_params(method, {}, n)
            return True
        except MergeInputError:
            return False
    return 2 if not runs(k) and runs(2) else k


def _theta0(method, base, keys=SHAPES):
    """The base for the methods defined on the models theta0 + tau_i (slerp, karcher)."""
    return {n: base[n] for n in keys} if get_method(method).needs.theta0 else None


@pytest.mark.parametrize("method", [m for m in available_methods() if method_scope(m) != "per-tensor"
                                    and not method_scope(m).startswith("refused")])
def test_exact_methods_equal_the_whole_vector_merge(pool, capsys, method):
    """'exact' in the help: the file merge equals fl_merge.merge on the whole task vectors
    (Krum's default f=1 needs K > 4: f=0 with the pool's three models)."""
    _, base, models, _, ms = pool
    k = _count(method)
    extra = ["--local-steps", 2, 3, 5] if _needs_steps(method) else []
    f0 = method in ("krum", "multikrum")
    extra += ["--param", "f=0"] if f0 else []
    got = merged_file(pool, capsys, "--method", method, "--eta", 0.7, *extra, count=k)
    kw = {"local_steps": [2, 3, 5]} if _needs_steps(method) else {"f": 0} if f0 else {}
    # steps standing in for FedNova normalisers: merge warns (plain-SGD a_i = t_i)
    with pytest.warns(UserWarning) if get_method(method).needs.normalisers else _nothing():
        delta = merge(method, _taus(base, models[:k]), names=model_names(ms[:k]),
                      theta0=_theta0(method, base), **kw)
    for n in SHAPES:
        torch.testing.assert_close(got[n], base[n] + 0.7 * delta[n])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_ties_takes_the_whole_updates_top_k_not_each_tensors_and_lambda_is_its_own(pool, capsys):
    _, base, models, _, _ = pool
    got = merged_file(pool, capsys, "--method", "ties", "--param", "density=0.3", "--lambda", 0.8)
    per_tensor = {n: merge("ties", _taus(base, models, [n]), density=0.3)[n] for n in SHAPES}
    whole = merge("ties", _taus(base, models), density=0.3)
    # TIES's lambda multiplies its disjoint mean: eta = lambda
    for n in SHAPES:
        torch.testing.assert_close(got[n], base[n] + 0.8 * whole[n])
    assert any(not torch.equal(per_tensor[n], whole[n]) for n in SHAPES)  # the check can fail


def test_every_registered_method_runs_or_is_refused_by_name(pool, capsys):
    tmp, base, models, b, ms = pool
    for method in available_methods():
        out = tmp / f"{method}.safetensors"
        extra = ["--local-steps", 1, 2, 3] if _needs_steps(method) else \
            {"krum": ["--param", "f=0"], "multikrum": ["--param", "f=0"]}.get(method, [])
        rc, err = run(["--base", b, "--models", *ms[:_count(method)], "--method", method,
                       "--lambda", 0.2, "--out", out, *extra], capsys)
        if method_scope(method).startswith("refused"):
            assert rc == 2 and method in err and not out.exists()
            assert len(err.strip().splitlines()) == 1
            if get_method(method).personal:
                assert "its own merged model" in err
            else:
                assert all(f"--extras {n}=" in err for n in get_method(method).needs.extras)
        else:
            assert rc == 0, err
            assert set(load_file(str(out))) == set(base)


def test_fednova_without_steps_names_what_is_missing(pool, capsys):
    tmp, _, _, b, ms = pool
    rc, err = run(["--base", b, "--models", *ms, "--method", "fednova", "--lambda", 0.2,
                   "--out", tmp / "o.safetensors"], capsys)
    assert rc == 2 and "--local-steps" in err and len(err.strip().splitlines()) == 1


def test_int_buffers_disagreeing_stop_naming_the_tensor(tmp_path, capsys):
    base, models = make_pool()
    models[1]["bn.num_batches_tracked"] = torch.tensor(9)
    b, ms = write_pool(tmp_path, base, models)
    out = tmp_path / "out.safetensors"
    rc, err = run(["--base", b, "--models", *ms, "--method", "task_arithmetic", "--lambda", 0.3,
                   "--out", out], capsys)
    assert rc == 2 and "bn.num_batches_tracked" in err and "averaged" in err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    # asked for, the base's values are kept
    assert run(["--base", b, "--models", *ms, "--method", "task_arithmetic", "--lambda", 0.3,
                "--out", out, "--non-float", "base"], capsys)[0] == 0
    assert torch.equal(load_file(str(out))["bn.num_batches_tracked"], torch.tensor(7))


def test_sharded_output_round_trips_with_a_hugging_face_index(pool, capsys):
    tmp, base, models, b, ms = pool
    single, sharded = tmp / "one.safetensors", tmp / "many.safetensors"
    common = ["--base", b, "--models", *ms, "--method", "task_arithmetic", "--lambda", 0.3]
    assert run(common + ["--out", single], capsys)[0] == 0
    assert run(common + ["--out", sharded, "--max-shard-size", "130B"], capsys)[0] == 0
    assert not sharded.exists()
    index = json.loads((tmp / "many.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and files[0] == f"many-00001-of-{len(files):05d}.safetensors"
    one = load_file(str(single))
    from_shards = {}
    for f in files:
        part = load_file(str(tmp / f))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 130 or len(part) == 1
        from_shards.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    assert set(from_shards) == set(one) == set(index["weight_map"])
    for n in one:
        assert torch.equal(from_shards[n], one[n])
    # the sharded output is itself an accepted input (as the index file and as its folder)
    with Checkpoint(tmp / "many.safetensors.index.json") as ck:
        assert all(torch.equal(ck.get(n), one[n]) for n in one)


def test_folder_output_is_a_hugging_face_folder(pool, capsys):
    tmp, base, models, b, ms = pool
    out = tmp / "merged"
    assert run(["--base", b, "--models", *ms, "--method", "fedavg", "--eta", 1, "--out", out], capsys)[0] == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(base) and f.metadata()["method"] == "fedavg"


def test_yaml_config_equals_the_flags(pool, capsys):
    tmp, base, models, b, ms = pool
    flags, cfg_out = tmp / "flags.safetensors", tmp / "yaml.safetensors"
    assert run(["--base", b, "--models", *ms, "--method", "ties", "--param", "density=0.5",
                "--lambda", 0.6, "--dtype", "fp16", "--out", flags], capsys)[0] == 0
    cfg = tmp / "merge.yaml"
    cfg.write_text(f"base: {b}\nmodels:\n" + "".join(f"  - {m}\n" for m in ms)
                   + f"method: ties\nparams:\n  density: 0.5\nlambda: 0.6\ndtype: fp16\nout: {cfg_out}\n")
    assert run([cfg], capsys)[0] == 0
    assert flags.read_bytes() == cfg_out.read_bytes()
    assert load_file(str(cfg_out))["enc.weight"].dtype == torch.float16


def _bad_cases(tmp, b, ms):
    other = tmp / "other.safetensors"
    bad_cfg = tmp / "bad.yaml"
    bad_cfg.write_text(f"base: {b}\nmodels: [{ms[0]}]\nmethod: fedavg\neta: 1\nout: x\nlr: 3\n")
    common = ["--method", "fedavg", "--eta", 1]
    return {
        "missing": (["--base", b, "--models", tmp / "nope.safetensors", *common], "nope.safetensors"),
        "keys": (["--base", b, "--models", ms[0], other, *common], "enc.weight"),
        "shape": (["--base", b, "--models", ms[0], tmp / "shape.safetensors", *common], "head.weight"),
        "method": (["--base", b, "--models", *ms, "--method", "avg", "--eta", 1],
                   "unknown merge method 'avg'"),
        "param": (["--base", b, "--models", *ms, "--method", "ties", "--param", "dens=0.2", "--eta", 1],
                  "dens"),
        "both": (["--base", b, "--models", *ms, "--method", "fedavg", "--eta", 1, "--lambda", 1], "both"),
        "neither": (["--base", b, "--models", *ms, "--method", "fedavg"], "neither"),
        "config": ([bad_cfg], "lr"),
        "pickle": (["--base", tmp / "w.bin", "--models", *ms, *common], "torch pickle"),
        # a sharded checkpoint whose index names a shard that is not there, or a shard
        # that does not hold the tensor the index puts in it
        "lost-shard": (["--base", b, "--models", ms[0], tmp / "lost", *common],
                       "model-00002-of-00002.safetensors'] named in"),
        "wrong-shard": (["--base", b, "--models", ms[0], tmp / "wrong", *common],
                        "which does not hold it"),
    }


@pytest.mark.parametrize("case", ["missing", "keys", "shape", "method", "param", "both", "neither",
                                  "config", "pickle", "lost-shard", "wrong-shard"])
def test_bad_input_is_one_line_and_writes_nothing(pool, capsys, case):
    tmp, base, models, b, ms = pool
    for name, shard in (("lost", 2), ("wrong", 1)):  # a sharded model missing one shard's worth
        save_sharded(models[0], tmp / name)
        (tmp / name / f"model-0000{shard}-of-00002.safetensors").unlink()
    (tmp / "wrong" / "model-00001-of-00002.safetensors").write_bytes(
        (tmp / "wrong" / "model-00002-of-00002.safetensors").read_bytes())
    save_file({n: v for n, v in models[0].items() if n != "enc.weight"}, str(tmp / "other.safetensors"))
    save_file({**models[0], "head.weight": torch.zeros(6, 3)}, str(tmp / "shape.safetensors"))
    (tmp / "w.bin").write_bytes(b"x")
    argv, needle = _bad_cases(tmp, b, ms)[case]
    out = tmp / "out" / "merged.safetensors"
    if case != "config":
        argv = [*argv, "--out", out]
    before = sorted(p.name for p in tmp.rglob("*"))
    rc, err = run(argv, capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert sorted(p.name for p in tmp.rglob("*")) == before  # nothing written, not even a folder


def test_overflow_midway_leaves_no_shard_behind(tmp_path, capsys):
    base, models = make_pool(dtype=torch.float16)
    for m in models[1:]:  # theta0 + 1.0 * (about 2 x 60000) exceeds float16's 65504
        m["head.weight"] = torch.full((3, 6), 60000.0, dtype=torch.float16)
    b, ms = write_pool(tmp_path, base, models)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc, err = run(["--base", b, "--models", *ms, "--method", "task_arithmetic", "--lambda", 1.0,
                   "--out", tmp_path / "o.safetensors", "--max-shard-size", "64B"], capsys)
    assert rc == 2 and "head.weight" in err and "float16" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_nan_in_an_input_stops_naming_the_tensor(tmp_path, capsys):
    base, models = make_pool()
    models[1]["enc.bias"][2] = float("nan")
    b, ms = write_pool(tmp_path, base, models)
    for method in ("task_arithmetic", "median"):  # the chunked linear path and fl_merge.merge
        rc, err = run(["--base", b, "--models", *ms, "--method", method, "--lambda", 0.3,
                       "--out", tmp_path / "o.safetensors"], capsys)
        assert rc == 2 and "enc.bias" in err and not (tmp_path / "o.safetensors").exists()


def test_lambda_converts_by_each_methods_scale(pool, capsys):
    tmp, base, models, b, ms = pool
    for method in ("task_arithmetic", "ties", "median"):
        a, e = tmp / f"{method}_l.safetensors", tmp / f"{method}_e.safetensors"
        common = ["--base", b, "--models", *ms, "--method", method]
        assert run(common + ["--lambda", 0.25, "--out", a], capsys)[0] == 0
        assert run(common + ["--eta", eta_for_lambda(method, 0.25, 3), "--out", e], capsys)[0] == 0
        assert a.read_bytes() == e.read_bytes()
    assert eta_for_lambda("ties", 0.25, 3) == 0.25 and eta_for_lambda("median", 0.25, 3) == 0.75


@pytest.mark.parametrize("argv, needle", [
    (["--lambda", -0.3], "lambda must be positive and finite, got -0.3"),
    (["--lambda", 0], "lambda must be positive and finite, got 0.0"),
    (["--lambda", "inf"], "lambda must be positive and finite"),
    (["--eta", -1], "eta must be finite and >= 0, got -1.0"),
])
def test_a_scale_the_run_config_refuses_is_one_line_and_writes_nothing(pool, capsys, argv, needle):
    tmp, _, _, b, ms = pool
    before = sorted(p.name for p in tmp.rglob("*"))
    rc, err = run(["--base", b, "--models", *ms, "--method", "ties", *argv, "--out", tmp / "o"], capsys)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp.rglob("*")) == before


def test_the_file_merge_and_the_run_config_refuse_the_same_lambdas(tmp_path, capsys):
    """Issue 29: `fl-merge merge --lambda -0.3` was accepted while a run refused lambdas=-0.3."""
    from fl_merge.config.run_config import ConfigError, RunConfig

    cfg = tmp_path / "merge.yaml"
    cfg.write_text("base: b.safetensors\nmodels: [m.safetensors]\nmethod: fedavg\nlambda: -0.3\nout: o\n")
    rc, err = run([cfg], capsys)
    with pytest.raises(ConfigError) as run_config:
        RunConfig(num_clients=2, lambdas="-0.3").resolve()
    assert rc == 2 and "lambda must be positive and finite, got -0.3" in err
    assert "lambdas must be positive and finite, got '-0.3'" in str(run_config.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_reads_what_safetensors_reads_in_every_format(tmp_path, dtype):
    base, models = make_pool(dtype=dtype)
    _, ms = write_pool(tmp_path, base, models)
    for path, sd in zip(ms, models):
        with Checkpoint(path) as ck:
            assert set(ck.keys) == set(sd)
            for n, v in sd.items():
                assert ck.info(n).shape == tuple(v.shape) and torch.equal(ck.get(n), v)
            flat = sd["enc.weight"].reshape(-1)
            assert torch.equal(ck.read_flat("enc.weight", 7, 19), flat[7:19])


def test_the_one_writer_in_its_one_file_form_is_read_by_safetensors_itself(tmp_path):
    """save_tensors (the merged model, predictions, update and base caches): safetensors'
    own load_file reads every dtype back, metadata included; dict order does not change the
    bytes."""
    from fl_merge.core.safetensors_writer import save_tensors

    sd = {"z.w": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
          "a.ids": torch.arange(5, dtype=torch.int64), "m.mask": torch.tensor([True, False]),
          "h.bf": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "e.empty": torch.zeros(0, 3),
          "u.bytes": torch.tensor([0, 1, 255], dtype=torch.uint8)}
    a = save_tensors(tmp_path / "a.safetensors", sd, {"k": "v"})
    b = save_tensors(tmp_path / "b.safetensors", dict(reversed(sd.items())), {"k": "v"})
    assert a.read_bytes() == b.read_bytes()
    got = load_file(str(a))
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    with safe_open(str(a), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temps


def test_shard_planning_and_sizes():
    assert plan_shards([("a", 4), ("b", 4), ("c", 10), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(100) == 100


def test_random_masks_do_not_depend_on_where_the_files_are(pool, capsys, tmp_path_factory, monkeypatch):
    """dare's masks are keyed by each model's name, its path relative to the folder of all
    the models: the same files merged from another folder, or named by relative paths, give
    the same merged file."""
    tmp, _, _, b, ms = pool
    args = ["--method", "dare", "--param", "drop_rate=0.5", "--eta", 1.0]
    first = merged_file(pool, capsys, *args)
    moved = tmp_path_factory.mktemp("elsewhere") / "pool"
    shutil.copytree(tmp, moved)
    out = moved / "again.safetensors"
    monkeypatch.chdir(moved)
    rel = [Path(m).relative_to(tmp) for m in ms]
    assert run(["--base", "base.safetensors", "--models", *rel, *args, "--out", out], capsys)[0] == 0
    again = load_file(str(out))
    assert all(torch.equal(first[n], again[n]) for n in SHAPES)
    assert model_names(["/x/a/m.safetensors", "/x/b/m.safetensors"]) == ["a/m.safetensors", "b/m.safetensors"]
    assert model_names(["/x/a/m.safetensors"]) == ["m.safetensors"]


def test_a_matrix_method_on_a_checkpoint_without_matrices_is_one_line(tmp_path, capsys):
    """tsv_m on a checkpoint holding only vectors: one error line, nothing written."""
    base = {"a": torch.zeros(4), "b": torch.zeros(3)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in range(2):
        save_file({k: v + i + 1 for k, v in base.items()}, str(tmp_path / f"m{i}.safetensors"))
    out = tmp_path / "out.safetensors"
    rc, err = run(["--base", tmp_path / "base.safetensors", "--models", tmp_path / "m0.safetensors",
                   tmp_path / "m1.safetensors", "--method", "tsv_m", "--eta", 1, "--out", out], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "merge method 'tsv_m' merges 2-D weight matrices, but none of the 2 merged tensors" in err
    assert not out.exists()
