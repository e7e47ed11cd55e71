"""The streaming machinery under every method: blocks that end mid-tensor, dtypes and devices,
the sorting network, the radix select's order statistics, and the linear fast path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fl_merge.merging import streaming
from fl_merge.methods import get_method, merge
from methods.helpers import SHAPES, make_tvs


@pytest.mark.parametrize("method,kw", [
    ("fedavg", {}), ("median", {}), ("trimmed_mean", {"beta": 0.25}), ("fedgma", {"rho": 0.4}),
    ("cclip", {"tau": 2.0, "iters": 3}), ("krum", {}), ("multikrum", {"m": 3}),
    ("geometric_median", {}), ("ties", {"density": 0.3}), ("hetero", {}), ("pcb", {"ratio": 0.2}),
])
def test_block_streaming_matches_unblocked(monkeypatch, method, kw):
    """Tiny blocks force several blocks per tensor and blocks that end mid-tensor."""
    shapes = {"w": (37, 11), "b": (5,), "v": (130,)}
    tvs = make_tvs(6, 18, shapes=shapes)
    whole = merge(method, tvs, **kw)
    monkeypatch.setattr(streaming, "CPU_BLOCK", 6 * 7)
    monkeypatch.setattr(streaming, "MIN_ROW", 1)
    blocked = merge(method, tvs, **kw)
    for k in shapes:
        torch.testing.assert_close(blocked[k], whole[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["fedavg", "median", "cclip", "ties", "geometric_median"])
def test_dtype_and_device_round_trip(dtype, method):
    tvs = make_tvs(5, 19, dtype=dtype)
    out = merge(method, tvs, device="auto")
    ref = merge(method, [{k: v.double() for k, v in tv.items()} for tv in tvs])
    for k in SHAPES:
        assert out[k].dtype == dtype and out[k].device.type == "cpu"
        tol = 1e-9 if dtype == torch.float64 else 2e-2
        torch.testing.assert_close(out[k].double(), ref[k].double(), rtol=tol, atol=tol)


def test_float64_is_computed_in_float64():
    tvs = [{"a": torch.tensor([1.0 + 1e-12 * i], dtype=torch.float64)} for i in range(3)]
    assert float(merge("fedavg", tvs)["a"]) == pytest.approx(1.0 + 1e-12, abs=1e-15)


@pytest.mark.parametrize("n", list(range(1, 13)))
def test_sorting_network_zero_one_principle(n):
    nets = streaming.batcher_network(n)
    for bits in itertools.product([0, 1], repeat=n):
        v = list(bits)
        for i, j in nets:
            if v[i] > v[j]:
                v[i], v[j] = v[j], v[i]
        assert v == sorted(bits)


@pytest.mark.parametrize("k", [13, 16, 17, 24, 33, 40])
def test_sorted_rows_large_k(k):
    x = torch.randn(k, 300)
    rows = streaming.sorted_rows(x.clone(), list(range(k)))
    torch.testing.assert_close(torch.stack(rows), torch.sort(x, dim=0).values)


@pytest.mark.parametrize("method", ["fedavg", "fednova"])
def test_linear_fast_path_matches_the_stacked_function(method):
    """merge streams linear methods through their coefficients; the registered function on a
    stacked block must give the same update."""
    from fl_merge.merging.registry import normalized_weights

    tvs, w, a = make_tvs(5, 20), [1.0, 2.0, 3.0, 1.0, 0.5], [3.0, 1.0, 4.5, 1.0, 5.2]
    out = merge(method, tvs, w, normalisers=a)
    p = normalized_weights(w, 5).float()
    extra = {"normalisers": torch.tensor(a, dtype=torch.float64)} if method == "fednova" else {}
    for k in SHAPES:
        stacked = torch.stack([tv[k].reshape(-1) for tv in tvs])
        ref = get_method(method).fn(stacked, p, **extra).reshape(SHAPES[k])
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_signed_order_stats_are_numpy_sort(dtype):
    """Signed values over many binades, +0.0 and -0.0, subnormals, and (float64) distinct
    values with one float32 image (one bucket), streamed in ragged blocks."""
    g = np.random.default_rng(4)
    x = g.standard_normal((3, 4000)) * np.exp(4 * g.standard_normal((3, 4000)))
    x[0, :30], x[0, 30:60] = 0.0, -0.0
    x[1, :40] = np.finfo(np.float64 if dtype == torch.float64 else np.float32).smallest_subnormal
    x[2, :50] = 1.0 + np.arange(50) * 1e-12  # float64: 50 values, one float32 image
    x[2, 50:60] = -x[2, :10]
    t = torch.tensor(x, dtype=dtype)
    want = np.sort(t.double().numpy(), axis=1)
    mid = int((want[2] < 1.0).sum()) + 25  # the 25th of the 50 values near 1
    ranks = [[1, 2, 31, 60, 61, 2000, 3999, 4000], [1, 40, 41, 4000], [1, 10, 11, mid, 4000]]
    blocks = lambda: (t[:, s:s + 333].clone() for s in range(0, 4000, 333))  # noqa: E731
    out = streaming.order_stats(blocks, 3, ranks, torch.device("cpu"))
    assert out == [[float(want[i, r - 1]) for r in rs] for i, rs in enumerate(ranks)]
    assert out[2][3] == float(t[2, 24])


def test_order_stats_of_mostly_zero_magnitudes_count_the_zeros():
    """|values| that are mostly exact zeros (DARE's dropped entries, a frozen layer): the
    ranks inside the zeros and just past them, against numpy's sort."""
    g = np.random.default_rng(5)
    x = np.abs(g.standard_normal((2, 3000))) * (g.random((2, 3000)) < 0.1)
    x[1, :5] = 1e-42  # float32 subnormals share the zeros' bucket
    t = torch.tensor(x, dtype=torch.float32)
    want = np.sort(t.double().numpy(), axis=1)
    z = [int((t[i] == 0).sum()) for i in range(2)]
    ranks = [[1, z[0], z[0] + 1, 3000], [z[1], z[1] + 1, z[1] + 5, z[1] + 6]]
    out = streaming.order_stats(lambda: (t[:, s:s + 400] for s in range(0, 3000, 400)), 2, ranks,
                                torch.device("cpu"), signed=False)
    assert out == [[float(want[i, r - 1]) for r in rs] for i, rs in enumerate(ranks)]
