"""fl_merge.io.spill: states and task vectors on disk, read back memory-mapped, give the same
numbers as the in-memory path (checked against numpy, an independent computation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.methods import merge
from fl_merge.io.spill import MappedState, SpillDir, array_view, materialize, split_extras_lazy
from fl_merge.core.task_vectors import MergeInputError


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(33, 17, generator=g), "h": torch.randn(5, generator=g).half(),
            "b": torch.randn(4, generator=g).bfloat16(), "steps": torch.tensor(7),
            "empty": torch.zeros(0, 3), "d": torch.randn(6, generator=g, dtype=torch.float64)}


def test_state_round_trip_is_exact(tmp_path):
    spill = SpillDir(tmp_path)
    state = _state(0)
    mapped = spill.write("node 1 (partition 0)", state)
    assert isinstance(mapped, MappedState) and list(mapped) == list(state) and len(mapped) == len(state)
    for k, v in state.items():
        got = mapped[k]
        assert got.dtype == v.dtype and tuple(got.shape) == tuple(v.shape)
        assert np.array_equal(got.float().numpy(), v.float().numpy())
    with pytest.raises(KeyError):
        mapped["missing"]


def test_writes_to_a_mapped_tensor_stay_private(tmp_path):
    mapped = SpillDir(tmp_path).write("a", {"w": torch.ones(1000)})
    t = mapped["w"]
    t.add_(1.0)  # copy-on-write: the file and later reads are unchanged
    assert float(mapped["w"].sum()) == 1000.0 and float(t.sum()) == 2000.0


def test_task_vector_matches_numpy(tmp_path):
    theta0, theta = _state(0), _state(1)
    keys = ["w", "h", "b", "d"]
    tv = SpillDir(tmp_path).task_vector("c0", theta, theta0, keys)
    assert list(tv) == keys
    for k in keys:
        ref = theta[k].double().numpy() - theta0[k].double().numpy()
        want = torch.float64 if theta0[k].dtype == torch.float64 else torch.float32
        assert tv[k].dtype == want  # float16/bfloat16 updates are taken in float32
        np.testing.assert_allclose(tv[k].double().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_task_vector_errors_name_the_parameter(tmp_path):
    spill = SpillDir(tmp_path)
    theta0 = {"w": torch.zeros(3, 2), "v": torch.zeros(2)}
    with pytest.raises(MergeInputError, match=r"lack merged parameters \['v'\]"):
        spill.task_vector("c", {"w": torch.ones(3, 2)}, theta0)
    with pytest.raises(MergeInputError, match=r"parameter 'w' has shape \(2, 3\) but the base has \(3, 2\)"):
        spill.task_vector("c", {"w": torch.ones(2, 3), "v": torch.ones(2)}, theta0)


def test_merge_of_spilled_vectors_equals_numpy(tmp_path):
    spill = SpillDir(tmp_path)
    theta0 = {"w": torch.randn(64, 32), "b": torch.randn(32)}
    thetas = [{k: v + torch.randn_like(v) for k, v in theta0.items()} for _ in range(3)]
    mapped = [spill.task_vector(f"c{i}", spill.write(f"r{i}", t), theta0) for i, t in enumerate(thetas)]
    for method in ("task_arithmetic", "median"):
        delta = merge(method, mapped)
        for k in theta0:
            diffs = np.stack([t[k].numpy() - theta0[k].numpy() for t in thetas])
            ref = diffs.mean(0) if method == "task_arithmetic" else np.median(diffs, 0)
            np.testing.assert_allclose(delta[k].numpy(), ref, rtol=1e-5, atol=1e-6)


def test_materialize_and_cleanup(tmp_path):
    spill = SpillDir(tmp_path / "out")
    mapped = spill.write("x", {"w": torch.arange(6.0)})
    own = materialize(mapped)
    assert spill.path.parent == tmp_path / "out" and spill.path.name.startswith(".spill-")
    spill.cleanup()
    assert not spill.path.exists()
    assert own["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_array_view_reads_flower_arrays_without_a_copy():
    from flwr.app import Array

    for t in (torch.randn(7, 5), torch.arange(12, dtype=torch.int64).reshape(3, 4), torch.tensor(2.5),
              torch.randn(4).half()):
        arr = Array(t.numpy())
        view = array_view(arr)
        assert view.dtype == t.dtype and tuple(view.shape) == tuple(t.shape)
        assert torch.equal(view, t)
    big = Array(np.zeros(1 << 16, dtype=np.float32))
    assert array_view(big).numpy().base is not None  # a view of the Array's bytes


def test_write_arrays_empties_the_record_and_round_trips(tmp_path):
    from flwr.app import ArrayRecord

    state = {"a.w": torch.randn(6, 3), "extra.fisher.a.w": torch.rand(6, 3), "n": torch.tensor(3)}
    record = ArrayRecord(state)
    mapped = SpillDir(tmp_path).write_arrays("node-5", record)
    assert len(record) == 0  # each Array was freed as it was written
    weights, extras = split_extras_lazy(mapped)
    assert list(weights) == ["a.w", "n"] and list(extras) == ["fisher"]
    assert torch.equal(weights["a.w"], state["a.w"]) and torch.equal(weights["n"], state["n"])
    assert torch.equal(extras["fisher"]["a.w"], state["extra.fisher.a.w"])
