"""Fisher merging against its weighted mean in numpy and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.methods import merge
from methods.helpers import (
    SHAPES, WEIGHTS, assert_close, assert_refused, make_tvs, norm_p, small_fisher, stack,
)


@pytest.mark.parametrize("w", WEIGHTS)
def test_fisher(w):
    tvs = make_tvs(6, 15)
    g = torch.Generator().manual_seed(1)
    fis = [{k: torch.rand(s, generator=g) ** 3 for k, s in SHAPES.items()} for _ in range(6)]
    fis[2]["fc.bias"][:3] = 0.0
    x, f, p = stack(tvs), stack(fis), norm_p(w, 6)
    f0 = 1e-6  # the default floor added to every client's Fisher
    ref = np.array([sum(p[i] * (f[i, j] + f0) * x[i, j] for i in range(6))
                    / sum(p[i] * (f[i, j] + f0) for i in range(6)) for j in range(x.shape[1])])
    assert_close(merge("fisher", tvs, w, extras={"fisher": fis}), ref)
    # Fisher 0 everywhere but one client: that client's update wins there (up to the floor)
    only = [{k: torch.zeros(s) if i else torch.ones(s) for k, s in SHAPES.items()} for i in range(6)]
    assert_close(merge("fisher", tvs, w, extras={"fisher": only}, min_fisher=1e-12), x[0])
    # all-zero Fisher: no client is informative, the floor gives the plain weighted mean
    # (this was 0 before the floor: eps only in the denominator)
    zero = [{k: torch.zeros(s) for k, s in SHAPES.items()} for _ in range(6)]
    assert_close(merge("fisher", tvs, w, extras={"fisher": zero}), p @ x)


def test_fisher_single_client_returns_its_update_exactly():
    out = merge("fisher", [{"w": torch.ones(4)}], extras={"fisher": [{"w": torch.full((4,), 1e-9)}]})
    assert torch.equal(out["w"], torch.ones(4))  # was 0.091 with eps in the denominator only


def test_fisher_all_zero_is_the_plain_weighted_mean():
    g = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(5, generator=g)} for _ in range(3)]
    zero = [{"w": torch.zeros(5)} for _ in range(3)]
    out = merge("fisher", tvs, [1.0, 2.0, 5.0], extras={"fisher": zero})["w"]
    ref = (1 * tvs[0]["w"] + 2 * tvs[1]["w"] + 5 * tvs[2]["w"]) / 8
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_fisher_two_clients_by_hand():
    # p = (1/4, 3/4), f0 = 0.5. Coordinate 0: F = (1, 3): weights 0.25 * 1.5 = 0.375 and
    # 0.75 * 3.5 = 2.625, Delta = (0.375 * 1 + 2.625 * 3) / 3 = 2.75. Coordinate 1: F = 0:
    # weights 0.25 * 0.5 and 0.75 * 0.5, the plain weighted mean 0.25 * 2 - 0.75 * 2 = -1.
    tvs = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -2.0])}]
    fis = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 0.0])}]
    out = merge("fisher", tvs, [1.0, 3.0], extras={"fisher": fis}, min_fisher=0.5)["w"]
    assert out.tolist() == pytest.approx([2.75, -1.0], abs=1e-6)


@pytest.mark.parametrize("kw,match", [
    ({"min_fisher": 0.0}, r"min_fisher must lie in \[1e-30, 1e30\], got 0.0"),
    ({"min_fisher": -1.0}, "min_fisher must lie in"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("fisher", kw, match, extras={"fisher": small_fisher()})
