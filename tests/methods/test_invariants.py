"""Invariants of the merge methods: client permutation, identical clients, robustness to
one wild outlier, and hypothesis property tests over random shapes and client counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.merging.registry import check_method_params
from fl_merge.methods import available_methods, get_method, merge

SHAPES = {"a": (6, 5), "b": (5,), "c": (2, 3, 4)}
K = 7


def make(k=K, seed=0, shapes=SHAPES, center=None, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        tv = {n: torch.randn(s, generator=g) * noise for n, s in shapes.items()}
        if center is not None:
            tv = {n: v + center[n] for n, v in tv.items()}
        out.append(tv)
    return out


def fisher(k=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.rand(s, generator=g) + 0.1 for n, s in SHAPES.items()} for _ in range(k)]


# The base model, for the methods defined on the models theta0 + tau_i (slerp, karcher);
# the others ignore it.
THETA0 = {n: v * 3.0 for n, v in make(1, seed=77)[0].items()}


def call(method, tvs, weights=None, steps=None, fis=None, names=None, **kw):
    steps = steps if steps is not None else [5] * len(tvs)
    fis = fis if fis is not None else fisher(len(tvs))
    # regmean's Gram of the inputs of "a" [6, 5], built from the client's own Fisher draw of
    # "b" [5] (f f^T + diag(f): symmetric, positive definite), so it moves with its client
    grams = [{"a": torch.outer(f["b"], f["b"]) + torch.diag(f["b"])} for f in fis]
    extras = {"fisher": fis, "gram": grams}
    return merge(method, tvs, weights, steps, normalisers=steps, extras=extras, names=names,
                 theta0=THETA0, **kw)


def clients_for(method, kw=None) -> int:
    """K, or 2 for a method defined on exactly two models (slerp refuses any other count)."""
    try:
        check_method_params(method, kw or {}, K)
        return K
    except MergeInputError:
        return 2


def dist(a, b):
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)) ** 0.5


# Personal methods (EMR) return one model per client, not one Delta: their own test checks
# the same invariants per client (tests/methods/test_emr.py).
PERSONAL = {"emr"}
SHARED = [m for m in available_methods() if m not in PERSONAL]


# Every method is symmetric in its clients (Krum/Multi-Krum up to exact score ties); DARE
# keys its random masks by client name, so clients permuted with their names keep them.
@pytest.mark.parametrize("method", SHARED)
def test_permutation_of_clients(method):
    k = clients_for(method)
    tvs, w = make(k), [1.0, 2.0, 0.5, 3.0, 1.0, 1.5, 2.5][:k]
    steps, fis = [1, 2, 3, 4, 5, 6, 7][:k], fisher(k)
    names = [f"task-{i}" for i in range(k)]
    perm = [3, 0, 6, 2, 5, 1, 4] if k == K else list(range(k))[::-1]
    a = call(method, tvs, w, steps, fis, names)
    b = call(method, [tvs[i] for i in perm], [w[i] for i in perm], [steps[i] for i in perm],
             [fis[i] for i in perm], [names[i] for i in perm])
    assert dist(a, b) < 1e-5 * (1 + dist(a, {k: torch.zeros_like(v) for k, v in a.items()}))


# (method, params) for which K identical clients must give back their common vector.
IDENTICAL = [
    ("fedavg", {}), ("task_arithmetic", {}), ("fednova", {}), ("fedgma", {"rho": 0.9}),
    ("median", {}), ("trimmed_mean", {"beta": 0.3}), ("cclip", {"tau": 100.0}),
    ("cclip", {"tau": 0.5, "iters": 200}), ("krum", {}), ("multikrum", {"m": 2}),
    ("geometric_median", {}), ("ties", {"density": 1.0}), ("dare", {"drop_rate": 0.0}),
    ("dare", {"drop_rate": 0.0, "base": "ties"}), ("breadcrumbs", {"beta": 0.0, "gamma": 0.0}),
    ("fisher", {}), ("fisher", {"min_fisher": 1e3}), ("hetero", {}),
    ("hetero", {"gamma": 3.0, "clip": False}), ("model_stock", {}),
    # consensus: K identical clients each see the others add (K - 1) tau, so a TALL mask keeps
    # a weight only at mask_lambda <= 1/(K - 1) (Wang et al. 2024's definition; the default
    # 0.4 drops all of them at K = 7, tests/methods/test_consensus.py); 0 keeps everything.
    ("consensus", {"mask_lambda": 0.0}),
]


# Methods that by their paper's definition do NOT give back identical clients' common vector
# at any setting (their own tests check what they give instead: tests/methods/test_<name>.py).
NOT_IDENTICAL = {
    "tsv_m": "keeps floor(r / K) singular components per task: a rank-k approximation",
    "iso_c": "flattens the spectrum of the sum of the task matrices",
    "iso_cts": "flattens the spectrum of the common and task-specific subspaces",
    "pcb": "its authors' code caps the largest |tau_i| at the next order statistic and min-max "
           "normalises the scores, zeroing each client's lowest-scored entry",
    "wudi": "starts from the sum K tau and takes iters * lr-bounded Adam steps (300 x 1e-5); "
            "non-matrix tensors stay at the base by default",
}

# Every other registered method (a new method file) is held to it at its defaults.
IDENTICAL_CASES = IDENTICAL + [(m, {}) for m in SHARED
                               if m not in {n for n, _ in IDENTICAL} and m not in NOT_IDENTICAL]


def test_identical_list_names_registered_methods():
    assert {m for m, _ in IDENTICAL} <= set(available_methods())
    assert set(NOT_IDENTICAL) <= set(available_methods())
    assert {m for m in available_methods() if get_method(m).personal} == PERSONAL
    assert {m for m, _ in IDENTICAL_CASES} | set(NOT_IDENTICAL) == set(SHARED)


@pytest.mark.parametrize("method,kw", IDENTICAL_CASES)
def test_identical_clients_give_the_common_vector(method, kw):
    common = make(1, seed=5)[0]
    n = clients_for(method, kw)
    tvs = [{k: v.clone() for k, v in common.items()} for _ in range(n)]
    out = call(method, tvs, [1, 2, 3, 4, 5, 6, 7][:n], **kw)
    for k in SHAPES:
        torch.testing.assert_close(out[k], common[k], rtol=1e-5, atol=1e-5)


def test_sparsifiers_do_not_return_the_common_vector_by_default():
    """...and the exceptions above are real: at their defaults they do sparsify."""
    common = make(1, seed=5)[0]
    tvs = [{k: v.clone() for k, v in common.items()} for _ in range(K)]
    for method in ("ties", "dare", "breadcrumbs"):
        assert dist(call(method, tvs), common) > 0.1


ROBUST = [
    ("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1}),
    ("multikrum", {"f": 1}), ("geometric_median", {}), ("cclip", {"tau": 1.0, "iters": 60}),
    ("cclip", {"tau": 1.0, "iters": 3, "center": "median"}), ("hetero", {}),
]


@pytest.mark.parametrize("method,kw", ROBUST)
@pytest.mark.parametrize("outlier", ["huge", "flipped"])
def test_robust_methods_ignore_one_wild_outlier(method, kw, outlier):
    center = make(1, seed=9)[0]
    center = {k: v * 2.0 for k, v in center.items()}
    honest = make(K - 1, seed=10, center=center, noise=0.05)
    wild = ({k: torch.full_like(v, 1e4) for k, v in center.items()} if outlier == "huge"
            else {k: -20.0 * v for k, v in center.items()})
    tvs = honest[:3] + [wild] + honest[3:]
    honest_mean = merge("fedavg", honest)
    fed = merge("fedavg", tvs)
    out = call(method, tvs, **kw)
    spread = max(dist(h, honest_mean) for h in honest)  # ~0.35: one honest client's noise
    assert dist(fed, honest_mean) > 40.0  # the outlier drags plain averaging far away
    # robust ones stay within the honest clients' own spread (cclip: within tau/6 at its
    # fixed point; Krum returns one honest client)
    assert dist(out, honest_mean) < 1.1 * spread, (dist(out, honest_mean), spread)


# ------------------------------------------------------------------ hypothesis

shape_st = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
shapes_st = st.lists(shape_st, min_size=1, max_size=4).map(
    lambda ss: {f"p{i}": s for i, s in enumerate(ss)})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes_st, k=st.integers(1, 8), seed=st.integers(0, 2**16),
       w=st.lists(st.floats(0.1, 10.0), min_size=8, max_size=8))
def test_means_are_convex_combinations(shapes, k, seed, w):
    """fedavg, fisher, geometric_median, cclip (big radius), hetero and ties lie inside the
    coordinate-wise range of the clients, and fedavg equals the weighted sum."""
    tvs = make(k, seed, shapes)
    w = w[:k]
    lo = {n: torch.stack([tv[n] for tv in tvs]).amin(0) for n in shapes}
    hi = {n: torch.stack([tv[n] for tv in tvs]).amax(0) for n in shapes}
    p = torch.tensor(w, dtype=torch.float64) / sum(w)
    fed = merge("fedavg", tvs, w)
    for n in shapes:
        ref = sum(float(p[i]) * tvs[i][n].double() for i in range(k))
        torch.testing.assert_close(fed[n].double(), ref, rtol=1e-5, atol=1e-6)
    # Fisher values from the example's own seed (reproducible), and away from 0: fisher divides
    # by sum p_i F_i + 1e-8, which shrinks Delta toward 0 by up to |tau| * 1e-8 / sum p_i F_i,
    # outside [lo, hi] by more than the 1e-5 tolerance once every F_i < ~1e-3.
    g = torch.Generator().manual_seed(seed + 1)
    fis = [{n: 0.01 + torch.rand(s, generator=g) for n, s in shapes.items()} for _ in range(k)]
    outs = [merge("fisher", tvs, w, extras={"fisher": fis}), merge("geometric_median", tvs, w),
            merge("cclip", tvs, w, tau=1e6), merge("ties", tvs, w, density=0.5)]
    for out in outs:
        for n in shapes:
            assert bool((out[n] >= lo[n] - 1e-5).all() or (out[n] == 0).any())
            # ties may emit 0 where nobody agrees; everything else is inside [lo, hi]
            inside = (out[n] >= lo[n] - 1e-5) & (out[n] <= hi[n] + 1e-5)
            assert bool((inside | (out[n] == 0)).all())


