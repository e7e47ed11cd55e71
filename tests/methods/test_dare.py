"""DARE against its definition: masks from the seed hash written out here, rescale, then
the numpy mean or TIES."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.methods import merge
from methods.helpers import SHAPES, assert_close, assert_refused, make_tvs, norm_p, ref_ties, stack


def test_dare_drop_zero_is_fedavg_and_ties():
    tvs = make_tvs(5, 12)
    x, p = stack(tvs), norm_p(None, 5)
    assert_close(merge("dare", tvs, drop_rate=0.0), p @ x)
    assert_close(merge("dare", tvs, drop_rate=0.0, base="ties", density=0.3), ref_ties(x, p, 0.3))


def test_dare_masks_and_rescale():
    big = {"a": (200, 50), "b": (1000,)}
    tvs = [{k: torch.randn(s) for k, s in big.items()} for _ in range(3)]
    for rate in (0.3, 0.9):
        out = merge("dare", tvs[:1], drop_rate=rate, seed=3)
        for k in big:
            o, t = out[k].numpy().ravel(), tvs[0][k].numpy().ravel()
            kept = o != 0
            # every entry is either dropped or rescaled by exactly 1/(1-p)
            np.testing.assert_allclose(o[kept], t[kept] / (1 - rate), rtol=1e-6)
            assert abs(kept.mean() - (1 - rate)) < 0.03
    a = merge("dare", tvs, drop_rate=0.5, seed=1)
    b = merge("dare", tvs, drop_rate=0.5, seed=1)
    c = merge("dare", tvs, drop_rate=0.5, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in big)
    assert not torch.equal(a["a"], c["a"])
    # unbiased: the average over seeds approaches fedavg
    avg = sum(merge("dare", tvs, drop_rate=0.5, seed=s)["b"] for s in range(200)) / 200
    fed = torch.from_numpy(np.mean([tv["b"].double().numpy() for tv in tvs], axis=0)).float()
    assert float((avg - fed).abs().mean()) < 0.1 * float(fed.abs().mean())


def mask(seed: int, client: str, key: str, n: int, drop_rate: float) -> np.ndarray:
    """DARE's keep-mask of one (client, tensor), as documented: a torch CPU generator seeded
    by BLAKE2b-64 of "seed\\x1fclient\\x1fkey" (little-endian, mod 2^63), kept where
    rand < 1 - drop_rate (written out here, not fl-merge's dare_seed)."""
    msg = "\x1f".join((str(seed), client, key)).encode()
    s = int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") % (2**63)
    return (torch.rand(n, generator=torch.Generator().manual_seed(s)) < 1 - drop_rate).numpy()


def test_dare_ties_base_matches_reference_on_dropped_vectors():
    tvs = make_tvs(4, 13)
    names = ["alpha", "beta", "gamma", "delta"]
    dropped = [np.concatenate([tv[k].double().numpy().reshape(-1)
                               * mask(5, name, k, tv[k].numel(), 0.4) / 0.6 for k in SHAPES])
               for name, tv in zip(names, tvs)]
    x, p = np.stack(dropped), norm_p(None, 4)
    ref = ref_ties(x, p, 0.5)
    assert_close(merge("dare", tvs, names=names, drop_rate=0.4, seed=5, base="ties", density=0.5),
                 ref, rtol=1e-4, atol=1e-5)
    # base fedavg: the p-weighted mean of the same masked, rescaled vectors
    assert_close(merge("dare", tvs, names=names, drop_rate=0.4, seed=5), p @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", ["fedavg", "ties"])
def test_dare_does_not_depend_on_client_order(base):
    g = torch.Generator().manual_seed(4)
    tvs = [{"a": torch.randn(30, 7, generator=g), "b": torch.randn(13, generator=g)} for _ in range(5)]
    w, names = [1.0, 2.0, 0.5, 3.0, 1.5], ["rot90", "invert", "parity", "blur", "noise"]
    perm = [2, 4, 0, 3, 1]
    kw = {"drop_rate": 0.6, "seed": 11, "base": base, "density": 0.5}
    a = merge("dare", tvs, w, names=names, **kw)
    b = merge("dare", [tvs[i] for i in perm], [w[i] for i in perm],
              names=[names[i] for i in perm], **kw)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7)
    # without names a client is keyed by its position (documented): order then matters
    c = merge("dare", [tvs[i] for i in perm], [w[i] for i in perm], **kw)
    d = merge("dare", tvs, w, **kw)
    assert not torch.allclose(c["a"], d["a"])


def test_dare_needs_unique_names():

    tvs = [{"a": torch.ones(3)} for _ in range(3)]
    with pytest.raises(MergeInputError, match="names must be unique, got 'x' twice"):
        merge("dare", tvs, names=["x", "y", "x"])


@pytest.mark.parametrize("kw,match", [
    ({"drop_rate": 1.0}, r"drop_rate must lie in \[0, 1\), got 1.0"),
    ({"drop_rate": -0.2}, r"drop_rate must lie in \[0, 1\)"),
    ({"base": "median"}, "base must be 'fedavg' or 'ties'"),
    ({"base": "ties", "density": 0}, r"density must lie in \(0, 1\]"),
    ({"seed": 1.5}, "seed must be an integer"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("dare", kw, match)


def test_mergekit_convention_keeps_the_l1_norm():
    """convention=mergekit rescales each kept tensor to its l1 norm (mergekit's
    RescaleNorm.l1) instead of dividing by 1 - drop_rate; the masks are the same."""
    tvs = make_tvs(1, 5)
    ours = merge("dare", tvs, drop_rate=0.5, seed=3)
    mk = merge("dare", tvs, drop_rate=0.5, seed=3, convention="mergekit")
    for key, tau in tvs[0].items():
        if tau.numel() < 2:
            continue
        assert torch.equal(ours[key] != 0, mk[key] != 0)
        assert float(mk[key].abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-6)
