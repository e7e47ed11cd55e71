"""Fuzzing the public merge API and the config loader (issue 8, point 5).

Random client counts, tensor dicts (shapes with zero-size dims, every dtype, NaN/Inf),
mismatched clients, junk weights / local steps / names / extras, every registered method
plus junk names and junk parameter values. The contract: `merge` either returns a dict
with exactly the input keys, shapes and dtypes, finite where the inputs were finite (and,
for identical clients, the common vector for every mean-like method), or raises
`MergeInputError` with a one-line message. The config loader either resolves or raises
`ConfigError` naming the key. Any other exception (a TypeError or RuntimeError from deep
inside torch, an IndexError, a ZeroDivisionError) is a bug.

Example counts are small so the whole file runs in a few tens of seconds on 2 cores.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from fl_merge import MergeInputError, PersonalDeltas, available_methods, merge
from fl_merge.merging.registry import check_method_params
from fl_merge.methods import get_method
from fl_merge.config.run_config import ConfigError, ResolvedConfig, RunConfig, flower_keys

# Deterministic by default (the same examples every run); FL_MERGE_FUZZ_EXAMPLES=5000 runs a
# longer, randomised search.
_EXAMPLES = int(os.environ.get("FL_MERGE_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    return settings(max_examples=_EXAMPLES or examples, deadline=None, derandomize=not _EXAMPLES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OTHER_DTYPES = (torch.int64, torch.bool, torch.complex64)
METHODS = available_methods()
JUNK_METHODS = ("", "FedAvg", "nope", "fedavg ", "median,fedavg", None, 3, ["fedavg"])
# Values a parameter may be given by a careless caller or a config typo.
JUNK_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, -1, 0.0, 0.5, 1.0, 1.5, -0.5, 1e300, -1e300, 2**70,
                     math.nan, math.inf, -math.inf, True, False, None, "", "0.5", "abc",
                     "zero", "mean", "median", "fedavg", "ties", [], [0.5], {}, (1, 2)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10, 10),
)
# Methods that give back the common vector of identical clients at their default
# parameters (fednova and hetero only with equal local step counts).
MEAN_LIKE = {"fedavg", "task_arithmetic", "fednova", "fedgma", "median", "trimmed_mean",
             "krum", "multikrum", "geometric_median", "hetero", "model_stock"}


def _base(method, tvs):
    """theta0 (zeros) for the methods defined on the models theta0 + tau_i (slerp, karcher)."""
    return {n: torch.zeros_like(v) for n, v in tvs[0].items()} if get_method(method).needs.theta0 \
        else None


def _takes(method, k, **kw) -> bool:
    """Whether `method` runs with k clients (slerp: exactly 2)."""
    try:
        check_method_params(method, kw, k)
        return True
    except MergeInputError:
        return False


def _tensor(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if dtype == torch.bool:
        return x > 0
    if dtype == torch.int64:
        return x.round().to(dtype)
    return x.to(dtype)


# What a generated call gets wrong: nothing (about half the calls), or one or two of these.
FAULTS = ("clients", "dtype", "method", "params", "weights", "steps", "names", "extras", "device")


@st.composite
def layouts(draw, odd_dtypes=False):
    """{key: (shape, dtype)}: 0..3 keys (1..3 unless `odd_dtypes`), 0..3 dims of size 0..3
    (zero-size ones included); float dtypes, or any dtype with `odd_dtypes`."""
    names = draw(st.lists(st.sampled_from(["w", "b", "layer.0.weight", "x"]),
                          min_size=0 if odd_dtypes else 1, max_size=3, unique=True))
    dtype = st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES if odd_dtypes else FLOAT_DTYPES)
    shape = st.lists(st.integers(0, 3), max_size=3).map(tuple)
    return {n: (draw(shape), draw(dtype)) for n in names}


@st.composite
def clients(draw, faulty=False, odd_dtypes=False):
    """(task vectors, identical?): 1..6 clients sharing one layout. `faulty`: 0..6 clients,
    maybe corrupted: a key dropped or added, a shape or dtype changed, a NaN/Inf put in,
    a tensor or a whole client replaced by junk; or a non-contiguous / grad-requiring
    tensor (valid: must merge)."""
    k = draw(st.integers(0 if faulty else 1, 6))
    layout = draw(layouts(odd_dtypes))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 100.0]))
    identical = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    tvs = [{n: _tensor(s, d, seed if identical else seed + i, scale) for n, (s, d) in layout.items()}
           for i in range(k)]
    if faulty and k:
        i = draw(st.integers(0, k - 1))
        what = draw(st.sampled_from(["drop", "add", "shape", "dtype", "nan", "inf", "junk",
                                     "not-a-dict", "noncontig", "grad", "sparse", "container"]))
        tv = tvs[i]
        keys = list(tv)
        if what == "drop" and keys:
            del tv[keys[0]]
        elif what == "add":
            tv["extra.key"] = torch.zeros(2)
        elif what == "shape" and keys:
            tv[keys[0]] = torch.zeros(*tv[keys[0]].shape, 2)
        elif what == "dtype" and keys:
            tv[keys[-1]] = tv[keys[-1]].to(draw(st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES)))
        elif what in ("nan", "inf") and keys and tv[keys[0]].numel() and tv[keys[0]].is_floating_point():
            flat = tv[keys[0]].reshape(-1)
            flat[draw(st.integers(0, flat.numel() - 1))] = math.nan if what == "nan" else -math.inf
        elif what == "junk" and keys:
            tv[keys[0]] = draw(st.sampled_from([None, 1.5, [1.0, 2.0], "tensor"]))
        elif what == "not-a-dict":
            tvs[i] = draw(st.sampled_from([None, 3, "abc", [torch.zeros(2)]]))
        elif what == "noncontig" and keys and tv[keys[0]].dim() >= 2:
            tv[keys[0]] = tv[keys[0]].transpose(0, 1).contiguous().transpose(0, 1)
        elif what == "grad" and keys and tv[keys[0]].is_floating_point():
            tv[keys[0]] = tv[keys[0]].clone().requires_grad_(True)
        elif what == "sparse" and keys and tv[keys[0]].dim() >= 1:
            tv[keys[0]] = tv[keys[0]].to_sparse()
        elif what == "container":
            tvs = draw(st.sampled_from([{"client": tvs[0]}, "abc", tuple(tvs), None, 7]))
    return tvs, identical


def _per_client(k, values):
    """A list of k values, a list of the wrong length, or junk."""
    return st.one_of(
        st.lists(values, min_size=k, max_size=k),
        st.lists(values, max_size=7),
        st.sampled_from(["abc", 3, 1.5, {"a": 1}, [[1, 2]], [None] * max(k, 1), [True] * k]),
    )


def _grams(tvs) -> list:
    """regmean's Gram matrices: for every 2-D float tensor [d_out, d_in] of the first client,
    I + 1 1^T [d_in, d_in] (symmetric positive definite), the same for every client."""
    ref = tvs[0] if isinstance(tvs, (list, tuple)) and tvs and isinstance(tvs[0], dict) else {}
    g = {n: torch.eye(v.shape[1]) + 1.0 for n, v in ref.items() if isinstance(v, torch.Tensor)
         and v.dim() == 2 and v.is_floating_point() and v.layout == torch.strided}
    return [dict(g) for _ in (tvs if isinstance(tvs, (list, tuple)) else [])]


def _extras(fis, tvs) -> dict:
    """What the methods needing client statistics get: Fisher, and regmean's Grams."""
    return {"fisher": fis, "gram": _grams(tvs)}


@st.composite
def merge_calls(draw):
    faults = draw(st.one_of(st.just(set()), st.sets(st.sampled_from(FAULTS), min_size=1, max_size=2)))
    tvs, identical = draw(clients("clients" in faults, "dtype" in faults))
    k = len(tvs) if isinstance(tvs, (list, tuple)) else 1
    if "method" in faults:
        method = draw(st.sampled_from(JUNK_METHODS))
    else:
        method = draw(st.sampled_from(METHODS))
    params = {}
    if "params" in faults:
        known = sorted(get_method(method).params) if method in METHODS else []
        pnames = st.sampled_from(known + ["junk_param"]) if known else st.just("junk_param")
        params = draw(st.dictionaries(pnames, JUNK_VALUES, min_size=1, max_size=2))
    if "weights" in faults:
        weights = draw(_per_client(k, st.floats(allow_nan=True, allow_infinity=True)))
    else:
        weights = draw(st.one_of(st.none(), st.lists(st.floats(0.0, 10.0), min_size=k, max_size=k)
                                 .filter(lambda w: sum(w) > 0)))
    if "steps" in faults:
        steps = draw(_per_client(k, st.one_of(st.integers(-2, 3), st.floats())))
    else:
        steps = draw(st.one_of(st.just([5] * k), st.lists(st.integers(1, 10), min_size=k, max_size=k),
                               st.none() if method != "fednova" else st.just([5] * k)))
    if "names" in faults:
        names = draw(st.one_of(st.lists(st.text(max_size=3), max_size=7),
                               st.sampled_from(["ab", 5, {"a": 1}])))
    else:
        names = draw(st.one_of(st.none(), st.lists(st.text(max_size=3), min_size=k, max_size=k)))
    extras = None
    if "extras" in faults:
        extras = draw(st.sampled_from([{}, {"fisher": []}, {"fisher": "x"}, {"junk": []}, "abc", 3,
                                       {"fisher": [None] * k}, {"fisher": {"w": 1}}]))
    elif method in ("fisher", "regmean") or draw(st.booleans()):
        extras = {"fisher": [{n: v.detach().to(torch.float32).abs() if isinstance(v, torch.Tensor)
                              and not v.is_sparse and not v.is_complex() else v
                              for n, v in tv.items()} if isinstance(tv, dict) else tv
                             for tv in (tvs if isinstance(tvs, (list, tuple)) else [])]}
        if method == "regmean":
            extras["gram"] = _grams(tvs)
    if "device" in faults:
        device = draw(st.sampled_from(["junk", "cuda:7", "cuda", 3, 2.5, "meta", ["cpu"]]))
    else:
        device = draw(st.sampled_from(["cpu", "auto", None, torch.device("cpu")]))
    return {"method": method, "task_vectors": tvs, "weights": weights, "local_steps": steps,
            "names": names, "extras": extras, "device": device, "params": params,
            "identical": identical, "faults": faults}


def _valid_floats(tvs):
    return bool(tvs) and all(isinstance(tv, dict) and all(
        isinstance(v, torch.Tensor) and v.is_floating_point() for v in tv.values()) for tv in tvs)


def _finite(v):
    return bool(torch.isfinite(v.float()).all())


def _as_deltas(out):
    """The Deltas a merge result gives: one shared Delta, or a personal method's (EMR) one
    per client."""
    return [out.delta(i) for i in range(len(out))] if isinstance(out, PersonalDeltas) else [out]


@fuzz(800)
@given(call=merge_calls())
def test_merge_returns_a_valid_delta_or_a_clear_error(call):
    tvs, params = call["task_vectors"], call["params"]
    try:
        out = merge(call["method"], tvs, call["weights"], call["local_steps"], names=call["names"],
                    device=call["device"], extras=call["extras"], **params)
    except MergeInputError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        event("MergeInputError")
        return
    event(f"merged ({'identical' if call['identical'] else 'random'} clients)")
    event(f"merged despite {sorted(call['faults'])}")
    # It merged: the inputs were valid float task vectors, and the result mirrors them.
    assert _valid_floats(tvs)
    ref = tvs[0]
    for delta in _as_deltas(out):  # one shared Delta, or each client's own (EMR)
        _check_delta(delta, ref, call, params)


def _check_delta(out, ref, call, params):
    assert isinstance(out, dict) and list(out) == list(ref)
    for key, r in ref.items():
        v = out[key]
        assert isinstance(v, torch.Tensor) and v.device.type == "cpu"
        assert v.shape == r.shape and v.dtype == r.dtype, key
        assert not v.requires_grad
        # Inputs were finite (merge checks); moderate inputs give a finite Delta.
        assert _finite(v), (call["method"], params, key)
    # Identical clients: a mean-like method at its defaults gives back the common vector.
    steps = call["local_steps"]
    equal_steps = steps is None or len({float(s) for s in steps}) == 1
    if call["identical"] and call["method"] in MEAN_LIKE and not params and equal_steps:
        for key, r in ref.items():
            tol = 1e-2 if r.dtype in (torch.float16, torch.bfloat16) else 1e-5
            torch.testing.assert_close(out[key].double(), r.detach().double(), rtol=tol, atol=tol)


@fuzz(150)
@given(method=st.sampled_from(METHODS), k=st.integers(1, 6), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(FLOAT_DTYPES),
       shape=st.lists(st.integers(0, 3), max_size=3).map(tuple),
       weights=st.one_of(st.none(), st.lists(st.floats(0.0, 5.0), min_size=6, max_size=6)))
def test_valid_inputs_merge_with_every_method(method, k, seed, dtype, shape, weights):
    """Valid float inputs of any shape (zero-size included), any float dtype and weights
    with zeros: every method that accepts the client count returns a finite Delta."""
    if weights is not None:
        weights = weights[:k]
        assume(sum(weights) > 0)
    tvs = [{"w": _tensor(shape, dtype, seed + i), "b": _tensor((2,), dtype, seed - i)}
           for i in range(k)]
    fis = [{n: v.abs().float() for n, v in tv.items()} for tv in tvs]
    try:
        check_method_params(method, {}, k)
    except MergeInputError:
        return  # too few clients for this method: covered by the first test
    try:
        result = merge(method, tvs, weights, [3] * k, extras=_extras(fis, tvs), theta0=_base(method, tvs))
    except MergeInputError as e:  # a personal method (EMR) takes no unequal weights
        assert get_method(method).personal and "takes no client weights" in str(e), e
        return
    for out in _as_deltas(result):
        for key, r in tvs[0].items():
            assert out[key].shape == r.shape and out[key].dtype == r.dtype
            assert _finite(out[key]), (method, key, out[key])


# DARE rescales kept entries by 1 / (1 - drop_rate): a value near the dtype's maximum may
# truly leave the range; that is a clear overflow error, never an Inf in the result.
# EMR's rescaler lambda_i >= 1 multiplies the unified vector the same way (tests/methods/test_emr.py).
MAY_OVERFLOW = {"dare", "emr"}


@pytest.mark.parametrize("k", [4, 5])  # even K: the median averages two middle values
@pytest.mark.parametrize("dtype,top", [(torch.float32, 3e38), (torch.float16, 6e4),
                                       (torch.bfloat16, 3e38)])
@pytest.mark.parametrize("method", METHODS)
def test_extreme_but_finite_values_stay_finite(method, dtype, top, k):
    """Values near the dtype's maximum (their sums, differences and squares overflow):
    every method averaging them stays finite."""
    tvs = [{"w": torch.full((3,), top * s, dtype=dtype), "b": torch.tensor([top, -top], dtype=dtype)}
           for s in (1.0, 0.9, -1.0, 0.5, 1.0)[:k]]
    fis = [{n: torch.ones(v.shape) for n, v in tv.items()} for tv in tvs]
    kw = {"f": 0} if method in ("krum", "multikrum") else {}
    if not _takes(method, k, **kw):
        tvs, fis, k = tvs[:2], fis[:2], 2  # slerp: exactly two models
    try:
        out = merge(method, tvs, local_steps=[4] * k, extras=_extras(fis, tvs),
                    theta0=_base(method, tvs), **kw)
    except MergeInputError as e:
        assert method in MAY_OVERFLOW and "overflows" in str(e), e
        return
    assert all(_finite(v) for d in _as_deltas(out) for v in d.values()), out


def _tvs(k=3, shape=(3,)):
    return [{"w": torch.randn(shape, generator=torch.Generator().manual_seed(i))} for i in range(k)]


# Inputs the fuzzer found crashing (or silently returning NaN) before the fixes, each with
# the clear error it now gets. (method, task vectors, keyword arguments, message pattern.)
REGRESSIONS = [
    ("list as method name", ["fedavg"], _tvs(), {}, "merge method must be a name"),
    ("task vectors a dict", "fedavg", {"client": _tvs()[0]}, {}, "must be a list of dicts"),
    ("task vectors an int", "fedavg", 7, {}, "must be a list of dicts"),
    ("a client is a string", "hetero", _tvs(1) + ["3"], {}, "client 1's update is str"),
    ("names an int", "fedavg", _tvs(), {"names": 5}, "names must be a list"),
    ("weights a string", "fedavg", _tvs(), {"weights": "abc"}, "weights must be 3 numbers"),
    ("weights overflow their sum", "fedavg", _tvs(2), {"weights": [1e308, 1e308]}, None),
    ("local_steps an int", "fednova", _tvs(), {"local_steps": 3}, "local_steps must be 3"),
    ("local_steps NaN", "fednova", _tvs(2), {"local_steps": [math.nan, 1]},
     "local_steps must be 2 positive numbers"),
    ("local_steps Inf", "hetero", _tvs(2), {"local_steps": [math.inf, 1]},
     "local_steps must be 2 positive numbers"),
    ("extras an int", "fedavg", _tvs(), {"extras": 3}, "extras must be a dict"),
    ("extras a string", "cclip", _tvs(), {"extras": "abc"}, "extras must be a dict"),
    ("extras hold None", "cclip", _tvs(2), {"extras": {"fisher": [None, None]}},
     r"client 0: extras\['fisher'\] is NoneType"),
    ("device junk", "trimmed_mean", _tvs(), {"device": "junk"}, "device must be"),
    ("device a list", "cclip", _tvs(), {"device": ["cpu"]}, "device must be"),
    ("device meta", "breadcrumbs", _tvs(), {"device": "meta"}, "device must be"),
    ("a sparse tensor", "fedavg", [{"w": torch.ones(3).to_sparse()}] * 2, {}, "sparse"),
    ("param a list", "trimmed_mean", _tvs(), {"beta": []}, "beta must be a finite number"),
    ("param a numeric string", "cclip", _tvs(), {"tau": "1"}, "tau must be a finite number"),
    ("param None", "multikrum", _tvs(5), {"f": None}, r"f \(number of Byzantine"),
    ("param an empty string", "multikrum", _tvs(5), {"f": ""}, r"f \(number of Byzantine"),
    ("iters infinite", "cclip", _tvs(), {"iters": math.inf}, "iters must be an integer"),
    ("iters huge (hung the merge)", "cclip", _tvs(), {"iters": 2**70}, "at most 10000"),
    ("seed NaN", "dare", _tvs(), {"seed": math.nan}, "seed must be an integer"),
    ("rho text", "fedgma", _tvs(), {"rho": "abc"}, "rho must be a finite number"),
    ("center of the wrong shape", "cclip", _tvs(), {"center": {"w": torch.zeros(2)}},
     r"center\['w'\] has shape \(2,\)"),
    ("center with other keys", "cclip", _tvs(), {"center": {"x": torch.zeros(3)}},
     "center has different parameters"),
    ("multikrum picks only zero-weight clients (was NaN)", "multikrum",
     [{"w": torch.zeros(3) + 0.01 * i} for i in range(4)] + [{"w": torch.full((3,), 50.0)}],
     {"weights": [0, 0, 0, 0, 1], "f": 1, "m": 1}, "whose weights are all 0"),
    ("a name with a line break", "fedavg", [{"w": torch.zeros(1)}, {"w": torch.ones(1) / 0}],
     {"names": ["a", "b\nc"]}, r"b\\nc: update of 'w' contains NaN"),
]


@pytest.mark.parametrize("what,method,tvs,kw,match", REGRESSIONS, ids=[r[0] for r in REGRESSIONS])
def test_inputs_that_used_to_crash(what, method, tvs, kw, match):
    if match is None:
        out = merge(method, tvs, **kw)
        assert all(_finite(v) for v in out.values()) and not all(
            bool((v == 0).all()) for v in out.values()), out
        return
    with pytest.raises(MergeInputError, match=match) as err:
        merge(method, tvs, **kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", METHODS)
def test_zero_size_tensors_merge_to_zero_size_tensors(method):
    """Zero-size parameters (alone or beside others) give zero-size results; this used to
    fail with 'range() arg 3 must not be zero' (and TIES with a rank error)."""
    for layout in ({"w": (0,)}, {"w": (2, 0, 3), "b": (0,)}, {"w": (0, 2), "b": (3,)}):
        k = 5 if _takes(method, 5) else 2
        tvs = [{n: _tensor(s, torch.float32, i) for n, s in layout.items()} for i in range(k)]
        fis = [{n: v.abs() for n, v in tv.items()} for tv in tvs]
        out = merge(method, tvs, local_steps=[2] * k, extras=_extras(fis, tvs),
                    theta0=_base(method, tvs))
        assert all({n: tuple(v.shape) for n, v in d.items()} == layout for d in _as_deltas(out))


def test_inputs_requiring_grad_merge_without_autograd():
    """Task vectors still attached to a graph: merged as data (the out= kernels used to
    refuse them), result detached."""
    tvs = [{"w": torch.randn(4, requires_grad=True)} for _ in range(5)]
    for method in METHODS:
        k = 5 if _takes(method, 5) else 2
        fis = [{"w": torch.ones(4)} for _ in tvs[:k]]
        base = {"w": torch.randn(4, requires_grad=True)} if get_method(method).needs.theta0 else None
        out = merge(method, tvs[:k], local_steps=[2] * k, extras=_extras(fis, tvs[:k]), theta0=base)
        for d in _as_deltas(out):
            assert not d["w"].requires_grad and _finite(d["w"])


# --------------------------------------------------------------------------- config loader

KEYS = flower_keys()
# Plausible values per key (so that many generated configs resolve), mixed with junk.
PLAUSIBLE = {
    "num-clients": [1, 2, 3, 4, 5, 8], "data": ["tasks", "iid", "dirichlet", "pathological", "shared"],
    "suite": ["mnist8", "mnist-far", "vision8"], "tasks": ["", "rotate90,parity", "invert",
                                             "csv:/nonexistent/bbc.csv?input=text&label=category"],
    "partition-task": ["rotate90", "parity", "folder:/nonexistent/digits"], "alpha": [0.1, 1.0, "0.5"],
    "classes-per-client": [1, 2, 5], "partition-pool": [100, 8000],
    "partition-probe": ["heldout", "val", "test"], "model": ["mnist-cnn"],
    "merge-keys": ["backbone.*", "backbone.conv*,backbone.fc*", "nothing.*"],
    "base-checkpoint": ["", "/nonexistent/base.safetensors"],
    "client-checkpoints": ["", "/nonexistent/a.safetensors,,", "/nonexistent/m.pt"],
    "checkpoint-steps": ["", "100", "10,20,30", 5],
    "pretrain-steps": [1, 40], "pretrain-seed": [0, 7], "method": METHODS + ["fedavg,ties,median"],
    "method-params": ["", "density=0.5", "ties.density=0.3", "iters=3", "f=0", "rho=0.9"],
    "etas": ["1", "0.5,1,2", 2, ""], "search": ["paper", "off"], "lambdas": ["", "0.3", "0.1,1"],
    "lines": ["", "paper", "off", "beta=0.5", "alpha=0.1 beta=0.1|0.5", "beta=-1", "pattern=x"],
    "weighting": ["uniform", "num-examples"],
    "learn-coefficients": ["off", "task", "block"], "coef-rounds": [1, 5], "coef-lr": [0.05, 1],
    "coef-objective": ["supervised", "entropy"], "greedy-soup": [True, False],
    "prescreen": [0, 0.25, 1.5], "finalists": [1, 3, 0], "spill": [True, False],
    "chunk-mib": [0.0, 0.8, 64.0], "max-shard-size": ["5GB", "40KB", "1.5GB", "0"],
    "measure-heterogeneity": [True, False], "ensemble": [True, False],
    "test-all-etas": [True, False, "true"], "local-steps": ["10", 5, "1..5", "10,20,30,40"],
    "lr": ["0.01", 0.1, "0.003..0.03"], "batch-size": ["32", 16, "16..64"], "seed": [0, 3],
    "client-seeds": ["spawn", "offset", "sequence"],
    "data-seed": [0, 1], "fisher-samples": [1, 256], "gram-samples": [1, 1000], "device": ["auto", "cpu"],
    "cache": [True, False], "output-dir": ["", "/tmp/fl-merge-fuzz"],
    "round-timeout": [10.0, 1800], "connect-timeout": [5, 120.0], "min-clients": [0, 1, 2],
    "attack": ["", "sign_flip", "scale", "alie"], "attackers": ["", "last:1", "0"],
    "attack-params": ["", "scale=2", "factor=3"], "faults": ["", "crash@1", "nan@0"],
    "fault-delay": [0.0, 1.5],
    "plugins": ["", "method:fedavg=fl_merge.methods.fedavg", "no.such.module", "task:x"],
}
assert set(PLAUSIBLE) == set(KEYS), "a new run-config key: give it plausible values here"
JUNK_CONFIG = st.one_of(
    st.sampled_from([0, 1, 2, 3, -1, 8, 9, 10**30, -(10**30), 0.0, 0.5, -0.5, 1e308, math.nan,
                     math.inf, -math.inf, True, False, None, "", " ", "abc", "0", "1", "-1",
                     "nan", "inf", "1e400", "1,2", "1,2,3,4", "1,2,3", "0,1", "1..", "..5",
                     "5..1", "1..5", "0..3", "1..1e30", "1..99999999999999999999",
                     "1..9223372036854775807", "0.001..0.1", "nan..1", "1..inf", "a..b",
                     "1...5", "fedavg", "fedavg,ties", "ties,ties", "krum", "density=0.5",
                     "ties.density=2", "iters=inf", "iters=1e9", "seed=nan", "rho=abc",
                     "beta=0.5", "f=1e300", "m=1.5", "center=origin", "base=median", "=3",
                     "x", "tasks", "iid", "mnist8", "rotate90,rotate90", "cuda", "maybe",
                     "sign_flip", "last:2", "last:9", "last:x", "crash@1", "nan@1,nan@1",
                     "crash@9", "boom@1", "scale=4", "z=-1", "factor=nan", "\n", [], [1, 2],
                     {"a": 1}, (1,)]),
    st.integers(), st.floats(), st.text(max_size=6),
)
JUNK_KEYS = ["no-such-key", "", "num_clients", "Num-Clients", 3, None]


@st.composite
def run_configs(draw):
    """1..4 entries: known keys with plausible values, each value junk with probability
    about 1/3, sometimes a junk key."""
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True))
    out = {}
    for key in keys:
        junk = draw(st.integers(0, 2)) == 0
        out[key] = draw(JUNK_CONFIG if junk else st.sampled_from(PLAUSIBLE[key]))
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.sampled_from(JUNK_KEYS))] = draw(JUNK_CONFIG)
    return out


def _names_a_key(message: str, config: dict) -> bool:
    """The message names one of the given keys (dashed or underscored) or quotes a word of
    one of the given values (e.g. the method or parameter a method-params string names),
    in any case, control characters shown escaped."""
    import re

    low = message.lower()
    for key, value in config.items():
        if repr(key) in message or f"'{key}'" in message:
            return True
        key = str(key).lower()
        if key and (key in low or key.replace("-", "_") in low or key.replace("_", "-") in low):
            return True
        text = str(value)
        words = [w for w in re.split(r"[\s=,.@:]+", text) if w]
        if text.lower() in low or repr(text)[1:-1] in message:
            return True
        if any(w.lower() in low for w in words if len(w) >= 3):
            return True
        if any(f"'{w}'" in message or repr(w)[1:-1] in message for w in words):
            return True  # a short name, quoted; or an escaped control character
    return False


@fuzz(500)
@given(config=run_configs())
def test_run_config_resolves_or_names_the_bad_key(config):
    try:
        cfg = RunConfig.from_flower(config).resolve()
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        assert _names_a_key(msg, config), (msg, config)
        event("ConfigError")
        return
    event("resolved")
    assert isinstance(cfg, ResolvedConfig)
    k = cfg.run.num_clients
    assert k >= 1 and len(cfg.tasks) == k == len(set(cfg.tasks))
    for values in (cfg.local_steps, cfg.batch_sizes):
        assert len(values) == k and all(isinstance(v, int) and 0 < v < 2**63 for v in values)
    assert len(cfg.lrs) == k and all(math.isfinite(v) and v > 0 for v in cfg.lrs)
    assert cfg.etas[0] == 0.0 and all(math.isfinite(e) for e in cfg.etas) and len(cfg.etas) >= 2
    assert cfg.methods and all(name in METHODS for name, _ in cfg.methods)
    run = cfg.run
    for name, params in cfg.methods:
        try:
            assert check_method_params(name, params, k) == {**get_method(name).params, **params}
        except MergeInputError:  # defaults that do not fit K (krum's f): only where the
            assert run.search == "paper"  # search picks the knob values K allows
    for f in ("alpha", "round_timeout", "connect_timeout"):
        assert math.isfinite(getattr(run, f)) and getattr(run, f) > 0, f
    assert math.isfinite(run.fault_delay) and run.fault_delay >= 0
    for f in ("seed", "data_seed", "pretrain_seed"):
        assert 0 <= getattr(run, f) < 2**63, f
    cfg.train_config()  # what clients receive builds


@pytest.mark.parametrize("faults", ["crash@", "crash@last:2", "crash@ 1"])
def test_malformed_fault_is_a_config_error(faults):
    with pytest.raises(ConfigError, match="fault"):
        RunConfig.from_flower({"faults": faults}).resolve()


def test_run_config_that_is_not_a_mapping():
    for junk in (None, [], "num-clients=3", 3, [("num-clients", 3)]):
        with pytest.raises(ConfigError, match="run config must be a mapping"):
            RunConfig.from_flower(junk)


# --------------------------------------------------------------------------- Hydra mapping

@pytest.fixture(scope="module")
def composed_default():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fl_merge import cli

    with initialize_config_dir(str(cli.CONFIG_DIR), version_base="1.3"):
        cfg = compose(cli.CONFIG_NAME)
    return OmegaConf.to_container(cfg, resolve=True)


# Hydra leaf -> run-config key whose plausible values it takes.
HYDRA_LEAVES = {
    ("top", "num_clients"): "num-clients", ("top", "seed"): "seed",
    ("data", "name"): "data", ("data", "alpha"): "alpha", ("data", "suite"): "suite",
    ("training", "local_steps"): "local-steps", ("training", "lr"): "lr",
    ("training", "batch_size"): "batch-size", ("eval", "etas"): "etas",
    ("eval", "weighting"): "weighting", ("runtime", "device"): "device",
    ("runtime", "cache"): "cache", ("attack", "name"): "attack",
    ("attack", "attackers"): "attackers", ("method", "name"): "method",
}
METHOD_PARAMS = sorted({p for m in METHODS for p in get_method(m).params})


@st.composite
def hydra_edits(draw):
    """1..3 edits (group, leaf, value) of a composed config: known leaves with plausible or
    junk values, method parameters, junk groups and keys, groups replaced by scalars."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 9))
        if kind < 5:
            group, leaf = draw(st.sampled_from(sorted(HYDRA_LEAVES)))
            plausible = PLAUSIBLE[HYDRA_LEAVES[(group, leaf)]]
            value = draw(st.sampled_from(plausible) if draw(st.booleans()) else JUNK_CONFIG)
            if leaf == "etas" and draw(st.booleans()):
                value = draw(st.lists(st.sampled_from([0.5, 1, 2, -1, "x"]), max_size=3))
        elif kind < 8:
            group, leaf = "method", draw(st.sampled_from(METHOD_PARAMS))
            value = draw(st.one_of(JUNK_VALUES, st.sampled_from([0.1, 0.3, 1, 2, 3])))
        elif kind == 8:
            group, leaf = draw(st.sampled_from(["junk", "runtime", "data", "top"])), "junk_key"
            value = draw(JUNK_CONFIG)
        else:
            group, leaf = draw(st.sampled_from(["model", "data", "method", "runtime"])), None
            value = draw(JUNK_CONFIG)
        edits.append((group, leaf, value))
    return edits


@fuzz(400)
@given(edits=hydra_edits())
def test_hydra_mapping_builds_a_job_or_names_the_bad_setting(composed_default, edits):
    import copy

    from fl_merge import cli

    cfg = copy.deepcopy(composed_default)
    for group, leaf, value in edits:
        if group == "top":
            cfg[leaf] = value
        elif leaf is None:
            cfg[group] = value
        else:
            node = cfg.get(group)
            if not isinstance(node, dict):
                node = cfg[group] = {}
            node[leaf] = value
    try:
        job = cli.build_job(cfg)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        event("ConfigError")
        return
    event("job built")
    assert isinstance(job.run, RunConfig) and job.num_supernodes >= job.run.num_clients
    job.run.resolve()
