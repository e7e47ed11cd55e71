"""`fl-merge merge` of the whole-update methods that declare a pass (TIES at its default
convention, Krum, Multi-Krum, CClip, the geometric median, PCB, DARE-TIES, hetero;
fl_merge/io/file_passes.py): the
file merge of K = 3 small safetensors checkpoints equals theta0 + eta * fl_merge.merge on
the whole task vectors (the test's own, from the tensors it wrote), TIES also the TIES
reference code written out in numpy and Krum the selection from distances written out in
numpy; on the same files the per-tensor variant differs, so every check can fail. The
pass reads the files one tensor at a time: its peak does not grow with the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fl_merge.cli.merge import main
from fl_merge.core.task_vectors import MergeInputError
from fl_merge.io import file_passes
from fl_merge.io.checkpoints import Checkpoint
from fl_merge.io.file_merge import merge_files, method_scope, model_names
from fl_merge.io.file_passes import file_pass, file_task_vectors
from fl_merge.merging import streaming
from fl_merge.methods import available_methods, merge
from methods.test_cclip import ref_cclip
from methods.test_hetero import ref_hetero
from methods.test_ties import ref_ties_reference
from round.test_global_pass import LiveBytes

SHAPES = {"enc.weight": (4, 5), "enc.bias": (6,), "head.weight": (3, 4)}
PASS_METHODS = ("ties", "krum", "multikrum", "cclip", "geometric_median", "pcb", "hetero")


def _write(tmp, base, models):
    """base.safetensors and m0..m{K-1}.safetensors (each with an int buffer the merge copies)."""
    extra = {"bn.num_batches_tracked": torch.tensor(7)}
    save_file({**base, **extra}, str(tmp / "base.safetensors"))
    paths = []
    for i, m in enumerate(models):
        paths.append(str(tmp / f"m{i}.safetensors"))
        save_file({**m, **extra}, paths[-1])
    return str(tmp / "base.safetensors"), paths


def _integer_pool(dtype, seed=6):
    """theta0 on a grid of 1/4 and task vectors of small integers: |tau| ties with the trim
    threshold, elected sums exactly 0; theta_i - theta0 is exact in fp16 and float32."""
    g = np.random.default_rng(seed)
    base = {n: torch.tensor(g.integers(-8, 9, size=s) / 4.0, dtype=dtype) for n, s in SHAPES.items()}
    taus = [{n: torch.tensor(g.integers(-3, 4, size=s).astype(np.float32)) for n, s in SHAPES.items()}
            for _ in range(3)]
    models = [{n: (base[n].float() + t[n]).to(dtype) for n in SHAPES} for t in taus]
    return base, models


def _random_pool(dtype, seed=0):
    """Random theta0 and models; client 2 is far from the others in enc.weight only, and
    head.weight is where clients 0 and 1 sit closest: a whole-vector choice or norm is not
    each tensor's."""
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}
    taus = [{n: torch.randn(s, generator=g) for n, s in SHAPES.items()} for _ in range(3)]
    taus[2]["enc.weight"] = taus[2]["enc.weight"] * 6
    taus[1]["head.weight"] = taus[0]["head.weight"] + 0.01 * taus[1]["head.weight"]
    models = [{n: (base[n].float() + t[n]).to(dtype) for n in SHAPES} for t in taus]
    return base, models


def _taus(base, models, keys=SHAPES):
    """The test's task vectors: theta_i - theta0 in float32."""
    return [{n: m[n].float() - base[n].float() for n in keys} for m in models]


def _flat(state) -> np.ndarray:
    return np.concatenate([state[n].double().numpy().ravel() for n in SHAPES])


def _file_merge(tmp, theta0, models, method, eta, weights=None, **params):
    b, ms = _write(tmp, theta0, models)
    out = tmp / "out.safetensors"
    merge_files(b, ms, method, eta, out, params, weights=weights)
    return load_file(str(out)), model_names(ms)


CASES = {
    "ties": ("ties", {"density": 0.3}),
    "ties-all": ("ties", {"density": 1.0}),
    "krum": ("krum", {"f": 0}),
    "multikrum": ("multikrum", {"f": 0, "m": 2}),
    "cclip": ("cclip", {"tau": 1.0, "iters": 3, "center": "median"}),
    "cclip-zero": ("cclip", {"tau": 2.0, "iters": 2}),
    "geometric_median": ("geometric_median", {"iters": 50}),
    "pcb": ("pcb", {"ratio": 0.2}),
    "pcb-all": ("pcb", {"ratio": 1.0}),
    "dare-ties": ("dare", {"base": "ties", "density": 0.5, "drop_rate": 0.3, "seed": 3}),
    "hetero": ("hetero", {"gamma": 2.0}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("unequal", [False, True], ids=["uniform", "weighted"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_file_merge_is_the_whole_update_merge(tmp_path, case, unequal, dtype):
    method, params = case
    # (a weight of 1/2 would make that model the geometric median of three, per tensor too)
    ties_like = method == "ties" or params.get("base") == "ties"
    weights = None if not unequal else [1.0, 2.0, 1.0] if ties_like else [1.0, 1.5, 1.0]
    pool = _integer_pool if ties_like else _random_pool
    base, models = pool(dtype)
    got, names = _file_merge(tmp_path, base, models, method, 0.5, weights, **params)
    whole = merge(method, _taus(base, models), weights, names=names, **params)
    for n in SHAPES:
        want = (base[n].float() + 0.5 * whole[n]).to(dtype)
        torch.testing.assert_close(got[n], want, rtol=0, atol=0 if ties_like else 1e-6)
    assert torch.equal(got["bn.num_batches_tracked"], torch.tensor(7))
    # the per-tensor variant the file merge ran before differs on these files
    per_tensor = {n: merge(method, _taus(base, models, [n]), weights, **params)[n] for n in SHAPES}
    assert any(not torch.allclose(per_tensor[n], whole[n]) for n in SHAPES)
    assert method_scope(method, params) == "exact"


@pytest.mark.parametrize("weights", [[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]])  # quarters: exact sums
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_ties_on_files_is_the_ties_reference_code_with_its_tie_sign(tmp_path, weights, density):
    base, models = _integer_pool(torch.float32)
    got, _ = _file_merge(tmp_path, base, models, "ties", 1.0, weights, density=density)
    x = np.stack([_flat(t) for t in _taus(base, models)])
    p = np.asarray(weights) / sum(weights)
    ref = ref_ties_reference(x, p, density)
    delta = np.concatenate([(got[n].double() - base[n].double()).numpy().ravel() for n in SHAPES])
    np.testing.assert_allclose(delta, ref, rtol=1e-6, atol=1e-6)
    # exact-0 elected sums over nonzero entries, decided by the whole update's majority sign
    tied = [j for j in range(x.shape[1]) if p @ x[:, j] == 0 and x[:, j].any()]
    assert tied and any(ref[j] != 0 for j in tied)


def test_an_exact_zero_sum_takes_the_whole_files_majority_not_its_tensors(tmp_path):
    # enc.bias alone elects +, -, -, 0 (its majority -: the tie would keep -2); the whole
    # update's majority is + (head.weight's 12 positive sums): the tie keeps +2
    base = {"enc.bias": torch.zeros(4), "head.weight": torch.zeros(3, 4)}
    a = {"enc.bias": torch.tensor([1.0, -1.0, -1.0, 2.0]), "head.weight": torch.ones(3, 4)}
    b = {"enc.bias": torch.tensor([1.0, -1.0, -1.0, -2.0]), "head.weight": torch.ones(3, 4)}
    b_, ms = _write(tmp_path, base, [a, b])
    merge_files(b_, ms, "ties", 1.0, tmp_path / "o.safetensors", {"density": 1.0})
    assert load_file(str(tmp_path / "o.safetensors"))["enc.bias"].tolist() == [1.0, -1.0, -1.0, 2.0]
    alone = merge("ties", [{"enc.bias": a["enc.bias"]}, {"enc.bias": b["enc.bias"]}], density=1.0)
    assert alone["enc.bias"].tolist() == [1.0, -1.0, -1.0, -2.0]


@pytest.mark.parametrize("method,params", [("krum", {"f": 0}), ("multikrum", {"f": 0, "m": 2})])
def test_krum_on_files_selects_by_the_whole_distances(tmp_path, method, params):
    base, models = _random_pool(torch.float32)
    b, ms = _write(tmp_path, base, models)
    x = np.stack([_flat(t) for t in _taus(base, models)])
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(d2[i], i))[: 3 - 0 - 2].sum() for i in range(3)]
    chosen = sorted(np.argsort(scores, kind="stable")[: 1 if method == "krum" else 2].tolist())
    with Checkpoint(b, "base") as bc:
        cks = [Checkpoint(m) for m in ms]
        stats = file_pass(method, params, bc, cks, list(SHAPES))
        for c in cks:
            c.close()
    assert stats["selected"] == chosen
    np.testing.assert_allclose(stats["sq_distances"].numpy(), d2, rtol=1e-6)
    got = merge_files(b, ms, method, 1.0, tmp_path / "o.safetensors", params)
    out = load_file(str(got[0]))
    want = x[chosen].mean(0)  # Multi-Krum: the uniform mean of the chosen
    delta = np.concatenate([(out[n].double() - base[n].double()).numpy().ravel() for n in SHAPES])
    np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-5)


def test_cclip_on_files_is_its_iteration_written_out(tmp_path):
    base, models = _random_pool(torch.float32)
    got, _ = _file_merge(tmp_path, base, models, "cclip", 1.0, [1.0, 2.0, 1.0], tau=1.0, iters=3,
                         center="median")
    x = np.stack([_flat(t) for t in _taus(base, models)])
    ref = ref_cclip(x, np.array([0.25, 0.5, 0.25]), 1.0, 3, np.median(x, axis=0))
    delta = np.concatenate([(got[n].double() - base[n].double()).numpy().ravel() for n in SHAPES])
    np.testing.assert_allclose(delta, ref, rtol=1e-5, atol=1e-5)


def test_hetero_on_files_with_normalisers_is_the_whole_merge_and_its_formula(tmp_path):
    """The pass's Gram matrix, the normalisers given to every tensor's merge: the file is
    theta0 + eta * hetero of the whole task vectors (clipping and cosines of the whole)."""
    base, models = _random_pool(torch.float32)
    b, ms = _write(tmp_path, base, models)
    a, w = [2.0, 1.0, 4.0], [1.0, 2.0, 1.0]
    merge_files(b, ms, "hetero", 0.5, tmp_path / "o.safetensors", {"clip": True}, weights=w,
                normalisers=a)
    got = load_file(str(tmp_path / "o.safetensors"))
    taus = _taus(base, models)
    whole = merge("hetero", taus, w, normalisers=a, clip=True)
    for n in SHAPES:
        assert torch.equal(got[n], base[n].add(whole[n], alpha=0.5)), n  # the file's theta0 + eta Delta
    ref, _ = ref_hetero(np.stack([_flat(t) for t in taus]), np.array([0.25, 0.5, 0.25]), a, 1.0, True)
    delta = np.concatenate([(got[n].double() - base[n].double()).numpy().ravel() for n in SHAPES])
    np.testing.assert_allclose(delta, 0.5 * ref, rtol=1e-5, atol=1e-6)


def test_the_cli_says_exact_and_merges_through_the_pass(tmp_path, capsys):
    base, models = _integer_pool(torch.float16)
    b, ms = _write(tmp_path, base, models)
    out = tmp_path / "o.safetensors"
    assert main(["--base", b, "--models", *ms, "--method", "ties", "--param", "density=0.3",
                 "--lambda", "1", "--out", str(out)]) == 0
    whole = merge("ties", _taus(base, models), density=0.3)
    got = load_file(str(out))
    assert all(torch.equal(got[n], (base[n].float() + whole[n]).half()) for n in SHAPES)
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for m in PASS_METHODS:
        assert any(line.split()[:2] == [m, "exact;"] for line in help_text.splitlines()), m


def test_which_methods_stay_per_tensor():
    assert all(method_scope(m) == "exact" for m in PASS_METHODS)
    assert method_scope("ties", {"convention": "mergekit"}) == "exact"  # per tensor, no pass
    assert method_scope("hetero") == "exact"  # its Gram-matrix pass
    assert method_scope("dare", {"base": "ties", "density": 0.5}) == "exact"  # DARE-TIES's pass


def test_a_whole_vector_method_without_a_pass_runs_on_each_tensor_alone(tmp_path, monkeypatch):
    """No built-in method is per-tensor any more (hetero declares its pass); a user's
    whole-vector method that declares neither per_tensor_exact nor a pass runs on each tensor
    alone: here the mean scaled to unit norm, on files each tensor's own norm."""
    import fl_merge.merging.registry as reg

    monkeypatch.setattr(reg, "_METHODS", dict(reg._METHODS))

    @reg.register("zz_unit_mean", coordinatewise=False)
    def zz_unit_mean(task_vectors, weights):
        mean = {k: sum(float(w) * tv[k] for w, tv in zip(weights, task_vectors)) for k in task_vectors[0]}
        norm = sum(float(v.double().pow(2).sum()) for v in mean.values()) ** 0.5
        return {k: v / norm if norm > 0 else v for k, v in mean.items()}

    assert [m for m in available_methods() if method_scope(m) == "per-tensor"] == ["zz_unit_mean"]
    base, models = _random_pool(torch.float32)
    got, _ = _file_merge(tmp_path, base, models, "zz_unit_mean", 0.7)
    for n in SHAPES:
        mean = sum(t[n].double() for t in _taus(base, models)) / 3
        want = base[n].double() + 0.7 * mean / mean.norm()  # this tensor's own norm
        torch.testing.assert_close(got[n].double(), want, rtol=1e-5, atol=1e-6)


def test_the_lazy_task_vectors_read_the_files_on_demand(tmp_path):
    base, models = _integer_pool(torch.float16)
    b, ms = _write(tmp_path, base, models)
    with Checkpoint(b) as bc, Checkpoint(ms[1]) as m1:
        (tv,) = file_task_vectors(bc, [m1], list(SHAPES))
        assert list(tv) == list(SHAPES) and len(tv) == 3 and "bn.num_batches_tracked" not in tv
        for n in SHAPES:
            v = tv[n]
            assert v.dtype == torch.float32 and torch.equal(v, models[1][n].float() - base[n].float())
        with pytest.raises(KeyError):
            tv["bn.num_batches_tracked"]


def test_a_nan_stops_the_pass_naming_model_and_tensor_before_writing(tmp_path, capsys):
    base, models = _random_pool(torch.float32)
    models[1]["head.weight"][0, 0] = float("nan")
    b, ms = _write(tmp_path, base, models)
    out = tmp_path / "o.safetensors"
    rc = main(["--base", b, "--models", *ms, "--method", "krum", "--param", "f=0", "--eta", "1",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "head.weight" in err and "m1.safetensors" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(MergeInputError, match="head.weight"):
        merge_files(b, ms, "ties", 1.0, out)


# -- peak memory: torch storages alive at once (tests/round/test_global_pass.py's tracker) --


def _peak(tmp, layers: int, method: str, params: dict) -> int:
    """The file merge's peak (K = 3 models of `layers` tensors of 64 KiB each, float32)."""
    g = torch.Generator().manual_seed(layers)
    base = {f"layer{i}.w": torch.randn(128, 128, generator=g) for i in range(layers)}
    tmp.mkdir()
    b, ms = _write(tmp, base, [{n: v + torch.randn(v.shape, generator=g) for n, v in base.items()}
                               for _ in range(3)])
    with LiveBytes() as mode:
        merge_files(b, ms, method, 1.0, tmp / "o.safetensors", params)
    return mode.peak


@pytest.mark.parametrize("method,params", [("ties", {}), ("krum", {"f": 0}), ("multikrum", {"f": 0, "m": 2}),
                                           ("cclip", {"center": "median"}), ("geometric_median", {}),
                                           ("pcb", {}), ("dare", {"base": "ties", "density": 0.5}),
                                           ("hetero", {})])
def test_the_pass_on_files_does_not_grow_with_the_model(tmp_path, monkeypatch, method, params):
    """What the file merge with its pass holds at once (the K models' tensors of one or two
    names (streaming.iter_blocks keeps the last name's while it reads the next), the base's,
    [K, n] blocks, TIES's K x 2^15 histograms) is the same for a model three times as large:
    a pass that kept a task vector, or a merge that kept the Delta, would hold 2 x 64 KiB x 12
    more."""
    monkeypatch.setattr(streaming, "CPU_BLOCK", 3 * 4096)  # several blocks per tensor
    small = _peak(tmp_path / "small", 6, method, params)
    large = _peak(tmp_path / "large", 18, method, params)
    assert large <= small + 16 * 1024, (small, large)
    assert file_passes.has_global_pass(method, params)
