"""Writing a merged model holds one tensor at a time: the safetensors writer lets go of each
tensor before it asks for the next, and a merged tensor (theta0 + eta * Delta, in theta0's
dtype) is computed in blocks into its result with the round's arithmetic, bit for bit
(reference: numpy float32, eta * Delta + theta0, rounded to theta0's dtype)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fl_merge.core.safetensors_writer import ONE_FILE, write_checkpoint
from fl_merge.io.merged_writer import merged_tensor
from fl_merge.models.assign import BLOCK


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_merged_tensor_is_the_float32_sum_rounded_to_theta0s_dtype_across_blocks(dtype):
    g = torch.Generator().manual_seed(0)
    n = BLOCK + 1000  # more than one block
    base = torch.randn(n, generator=g).to(dtype).reshape(-1, 8)
    delta = torch.randn(n, generator=g).reshape(-1, 8) * 1e-2
    eta = 0.37
    got = merged_tensor({"w": base, "b": base[0]}, {"w": delta}, "w", eta)
    want = (np.float32(eta) * delta.numpy() + base.numpy().astype(np.float32)).astype(base.numpy().dtype)
    assert got.dtype == dtype and got.shape == base.shape
    np.testing.assert_array_equal(got.numpy(), want)
    untouched = merged_tensor({"w": base, "b": base[0]}, {"w": delta}, "b", eta)
    assert torch.equal(untouched, base[0])  # not in Delta: theta0's own


def test_the_writer_lets_go_of_each_tensor_before_it_asks_for_the_next(tmp_path):
    alive_at_ask: list[int] = []
    refs: list[weakref.ref] = []
    specs = [(f"t{i}", torch.float32, (4, 3)) for i in range(5)]

    def tensors():
        for name, _, shape in specs:
            alive_at_ask.append(sum(r() is not None for r in refs))
            t = torch.full(shape, float(len(refs)))
            refs.append(weakref.ref(t))
            yield name, t
            del t

    write_checkpoint(tmp_path / "m.safetensors", specs, tensors(), ONE_FILE)
    assert alive_at_ask == [0, 0, 0, 0, 0]
    back = load_file(str(tmp_path / "m.safetensors"))
    assert [float(back[f"t{i}"][0, 0]) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
