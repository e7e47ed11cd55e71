"""DELLA (mergekit 0.1.5's della / della_linear) against its definition written out in numpy
with loops: per-row magnitude ranks, keep probabilities, L1 rescale, sign election (a zero
sum elects +), disjoint or plain weighted sums. The Bernoulli draws are torch's (the seed
hash written out here), from probabilities the reference computes itself."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fl_merge.merging.registry import get_method, is_per_tensor_exact
from fl_merge.merging.scales import eta_for_lambda
from fl_merge.methods import merge
from methods.helpers import SHAPES, WEIGHTS, assert_close, assert_refused, make_tvs, norm_p


def seed_of(seed, client, key):
    msg = "\x1f".join((str(seed), client, key)).encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") % (2**63)


def ref_prune(t, density, eps, rescale, seed, client, key):
    """della_magprune: rows = dim 1 of a >= 2-D tensor, else the whole tensor."""
    if density >= 1:
        return t.copy()
    shape = t.shape
    rows = t.reshape(1, -1) if t.ndim < 2 else t
    probs = np.zeros(rows.shape)
    n = rows.shape[1]
    for idx in np.ndindex(*(rows.shape[:1] + rows.shape[2:])):
        line = [rows[(idx[0], j) + idx[1:]] for j in range(n)]
        for j in range(n):
            rank = 1 + sum(1 for v in line if abs(v) < abs(line[j]))  # no ties in random data
            frac = (rank - 1) / (n - 1) if n > 1 else 0.5
            probs[(idx[0], j) + idx[1:]] = density - eps + 2 * eps * frac
    g = torch.Generator().manual_seed(seed_of(seed, client, key))
    keep = torch.bernoulli(torch.tensor(probs, dtype=torch.float32), generator=g).double().numpy()
    masked = (rows * keep).reshape(shape)
    if rescale:
        before, after = np.abs(t).sum(), np.abs(masked).sum()
        if before >= 1e-7 and after >= 1e-7:
            masked = masked * before / after
    return masked


def ref_della(tvs, p, density=1.0, epsilon=0.15, seed=0, linear=False, normalize=None, rescale=True,
              names=None):
    K = len(tvs)
    names = names or [f"client {i}" for i in range(K)]
    normalize = (not linear) if normalize is None else normalize
    out = []
    for key in SHAPES:
        d = [ref_prune(tvs[i][key].double().numpy(), density, epsilon, rescale, seed, names[i], key)
             .reshape(-1) for i in range(K)]
        for j in range(d[0].size):
            w = [p[i] * d[i][j] for i in range(K)]
            if linear:
                num, den = sum(w), sum(p)
            else:
                s = 1.0 if sum(w) >= 0 else -1.0
                agree = [i for i in range(K) if np.sign(w[i]) == s]
                num, den = sum(w[i] for i in agree), sum(p[i] for i in agree)
            out.append(num / (den if den != 0 else 1.0) if normalize else num)
    return np.array(out)


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("kw", [
    {}, {"density": 0.5}, {"density": 0.3, "epsilon": 0.1, "seed": 7},
    {"density": 0.6, "rescale": False}, {"density": 0.5, "linear": True},
    {"density": 0.5, "normalize": False}, {"density": 0.4, "linear": True, "normalize": True},
    {"density": 0.5, "epsilon": 0.0},
])
def test_della_is_mergekits_definition(w, kw):
    tvs = make_tvs(5, 31)
    p = norm_p(w[:5] if w else None, 5)
    expected = ref_della(tvs, p, **kw)
    assert_close(merge("della", tvs, w[:5] if w else None, **kw), expected, rtol=1e-5, atol=1e-5)


def test_by_hand_at_density_one():
    # coord 0: 1 + 3 - 2 > 0 elects +: mean of {1, 3} = 2; coord 1: -1 + 1 = 0 elects + (mergekit's
    # >= 0): only the +1 agrees; coord 2: all zero: nobody agrees, 0.
    tvs = [{"w": torch.tensor([1.0, -1.0, 0.0])}, {"w": torch.tensor([3.0, 1.0, 0.0])},
           {"w": torch.tensor([-2.0, 0.0, 0.0])}]
    assert merge("della", tvs)["w"].tolist() == pytest.approx([2.0, 1.0, 0.0])
    # normalize=False: the agreeing weighted sum (p = 1/3 each)
    assert merge("della", tvs, normalize=False)["w"].tolist() == pytest.approx([4 / 3, 1 / 3, 0.0])
    # della_linear: the weighted mean of everything
    assert merge("della", tvs, linear=True)["w"].tolist() == pytest.approx([2 / 3, 0.0, 0.0])


def test_large_entries_survive_more_often_and_rescale_keeps_the_l1_norm():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 400, generator=g)
    kept = np.zeros((4, 400))
    for seed in range(30):
        out = merge("della", [{"w": t}], density=0.5, epsilon=0.4, seed=seed)["w"]
        np.testing.assert_allclose(out.abs().sum(), t.abs().sum(), rtol=1e-5)
        kept += (out != 0).numpy()
    order = np.argsort(np.abs(t.numpy()), axis=1)
    low = np.take_along_axis(kept, order[:, :40], 1).mean() / 30   # p ~ 0.1 .. 0.18
    high = np.take_along_axis(kept, order[:, -40:], 1).mean() / 30  # p ~ 0.82 .. 0.9
    assert low < 0.25 and high > 0.75


def test_masks_follow_client_names_and_seed():
    tvs = make_tvs(3, 32)
    a = merge("della", tvs, names=["x", "y", "z"], density=0.5, seed=1)
    b = merge("della", tvs[::-1], names=["z", "y", "x"], density=0.5, seed=1)
    c = merge("della", tvs, names=["x", "y", "z"], density=0.5, seed=2)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in SHAPES)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    ref = ref_della(tvs, norm_p(None, 3), density=0.5, seed=1, names=["x", "y", "z"])
    assert_close(a, ref)


def test_per_tensor_is_the_method():
    tvs = make_tvs(4, 33)
    whole = merge("della", tvs, density=0.4, seed=3)
    for key in SHAPES:
        alone = merge("della", [{key: tv[key]} for tv in tvs], density=0.4, seed=3)
        assert torch.equal(alone[key], whole[key])
    assert is_per_tensor_exact("della", {"density": 0.4})


def test_one_entry_rows_keep_with_probability_density():
    t = torch.full((2000, 1), 2.0)
    out = merge("della", [{"w": t}], density=0.3, rescale=False)["w"]
    assert abs(float((out != 0).double().mean()) - 0.3) < 0.04
    assert set(out.unique().tolist()) <= {0.0, 2.0}


def test_declarations_and_lambda():
    m = get_method("della")
    assert m.params == {"density": 1.0, "epsilon": 0.15, "seed": 0, "linear": False,
                        "normalize": None, "rescale": True}
    assert m.space == {"density": (0.3, 0.5, 0.7)} and not m.coordinatewise
    assert eta_for_lambda("della", 0.5, 4) == 0.5  # normalized disjoint mean: eta = lambda
    assert eta_for_lambda("della", 0.5, 4, {"linear": True}) == 2.0  # della_linear: K lambda
    assert eta_for_lambda("della", 0.5, 4, {"linear": True, "normalize": True}) == 0.5
    assert eta_for_lambda("della", 0.5, 4, {"normalize": False}) == 2.0


@pytest.mark.parametrize("kw,match", [
    ({"density": 0.0}, r"density must lie in \(0, 1\], got 0.0"),
    ({"density": 1.5}, r"density must lie in \(0, 1\]"),
    ({"epsilon": -0.1}, r"epsilon must be >= 0, got -0.1"),
    ({"density": 0.9, "epsilon": 0.15}, r"density \+/- epsilon inside \(0, 1\)"),
    ({"density": 0.1, "epsilon": 0.1}, r"density \+/- epsilon inside \(0, 1\)"),
    ({"seed": 1.5}, r"seed must be an integer"),
    ({"linear": "yes"}, r"linear must be true or false"),
    ({"normalize": 1}, r"normalize must be true, false or null"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("della", kw, match)


def test_duplicate_names_are_refused():
    from fl_merge.core.task_vectors import MergeInputError
    with pytest.raises(MergeInputError, match="names must be unique"):
        merge("della", make_tvs(2, 1), names=["a", "a"], density=0.5)

