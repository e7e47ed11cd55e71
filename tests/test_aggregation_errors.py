"""Bad input gets one clear MergeInputError, raised before any arithmetic."""

from __future__ import annotations

import pytest
import torch

from fl_merge.merging.registry import check_method_params
from fl_merge.methods import merge
from fl_merge.core.task_vectors import MergeInputError


def tvs(k=6, shapes=None, seed=0):
    shapes = shapes or {"w": (3, 2), "b": (2,)}
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(k)]


def fis(k=6):
    return [{"w": torch.rand(3, 2), "b": torch.rand(2)} for _ in range(k)]


def raises(match, *args, **kw):
    with pytest.raises(MergeInputError, match=match):
        merge(*args, **kw)


def test_unknown_method_and_param():
    raises("unknown merge method 'nope'", "nope", tvs())
    raises(r"unknown parameter\(s\) \['densty'\] for merge method 'ties'", "ties", tvs(), densty=0.1)
    raises(r"unknown parameter", "median", tvs(), beta=0.1)


def test_task_vectors_must_match():
    t = tvs()
    t[2] = {"w": t[2]["w"]}
    raises("client 2 has different parameters", "fedavg", t)
    t = tvs()
    t[3]["w"] = torch.randn(2, 3)
    raises(r"client 3: parameter 'w' has shape \(2, 3\)", "median", t)
    t = tvs()
    t[1]["b"] = t[1]["b"].double()
    raises("client 1: parameter 'b' has dtype torch.float64", "krum", t)
    t = tvs()
    t[4]["w"][0, 0] = float("nan")
    raises("bob: update of 'w' contains NaN or Inf", "geometric_median", t,
           names=["a", "b", "c", "d", "bob", "f"])
    t = tvs()
    t[0]["b"][1] = float("inf")
    raises("client 0: update of 'b' contains NaN or Inf", "ties", t)
    raises("no task vectors", "fedavg", [])


def _bad_inputs():
    t = tvs(); t[2] = {"w": t[2]["w"]}; yield t, None  # noqa: E702
    t = tvs(); t[3]["w"] = torch.randn(2, 3); yield t, None  # noqa: E702
    t = tvs(); t[1]["b"] = t[1]["b"].double(); yield t, None  # noqa: E702
    t = tvs(); t[1]["b"] = torch.ones(2, dtype=torch.int64); yield t, None  # noqa: E702
    t = tvs(); t[4]["w"][0, 0] = float("nan"); yield t, list("abcdef")  # noqa: E702
    t = tvs(); t[0]["b"][1] = -float("inf"); yield t, None  # noqa: E702
    t = tvs(); t[0]["w"] = [1.0]; yield t, None  # noqa: E702
    yield tvs(), ["x"]
    yield [{}], None
    yield [], None


def test_messages_match_check_task_vectors():
    """merge's fast validation says exactly what task_vectors.check_task_vectors says."""
    from fl_merge.core.task_vectors import check_task_vectors

    for t, names in _bad_inputs():
        with pytest.raises(MergeInputError) as ref:
            check_task_vectors(t, names)
        with pytest.raises(MergeInputError) as got:
            merge("fedavg", t, names=names)
        assert str(got.value) == str(ref.value)


def test_finite_overflowing_sum_is_not_an_error():
    big = [{"w": torch.full((4,), 3e38), "b": torch.zeros(2)} for _ in range(3)]
    out = merge("median", big)
    assert float(out["w"][0]) == pytest.approx(3e38, rel=1e-6)


def test_weights_and_steps():
    raises("3 weights for 6 task vectors", "fedavg", tvs(), [1, 2, 3])
    raises("weights must be finite, non-negative", "fedavg", tvs(), [1, -1, 1, 1, 1, 1])
    raises("needs every client's local_steps", "fednova", tvs())
    raises("local_steps must be 6 positive numbers", "fednova", tvs(), local_steps=[1, 2, 0, 1, 1, 1])
    raises("local_steps must be 6 positive numbers", "hetero", tvs(), local_steps=[1, 2])
    raises("needs every client's local_steps or normalisers", "fednova", tvs(), normalisers=[None] * 6)
    raises("2 normalisers for 6 task vectors", "fednova", tvs(), normalisers=[1.0, 2.0])
    raises(r"normalisers must be 6 positive numbers \(None for a client without one\), got -1 for client 2",
           "fednova", tvs(), normalisers=[1, 1, -1, 1, 1, 1])
    raises("normalisers must be 6 positive numbers", "hetero", tvs(), normalisers="abc")
    raises("normalisers must be 6 positive numbers", "fedavg", tvs(), normalisers=[True] * 6)
    raises("c3 has no normaliser and there are no local_steps to fall back on", "fednova", tvs(),
           normalisers=[1, 1, 1, None, 1, 1], names=[f"c{i}" for i in range(6)])


@pytest.mark.parametrize("method,kw,match", [
    ("fedgma", {"rho": 1.5}, r"rho must lie in \[0, 1\], got 1.5"),
    ("fedgma", {"rho": -0.1}, r"rho must lie in \[0, 1\]"),
    ("ties", {"density": 0.0}, r"density must lie in \(0, 1\], got 0.0"),
    ("ties", {"density": 1.2}, r"density must lie in \(0, 1\]"),
    ("dare", {"drop_rate": 1.0}, r"drop_rate must lie in \[0, 1\), got 1.0"),
    ("dare", {"drop_rate": -0.2}, r"drop_rate must lie in \[0, 1\)"),
    ("dare", {"base": "median"}, "base must be 'fedavg' or 'ties'"),
    ("dare", {"base": "ties", "density": 0}, r"density must lie in \(0, 1\]"),
    ("dare", {"seed": 1.5}, "seed must be an integer"),
    ("cclip", {"tau": -1.0}, r"tau \(clipping radius\) must be > 0, got -1.0"),
    ("cclip", {"tau": 0.0}, r"tau \(clipping radius\) must be > 0"),
    ("cclip", {"iters": 0}, "iters must be an integer >= 1"),
    ("cclip", {"center": "origin"}, "center must be one of"),
    ("geometric_median", {"nu": 0.0}, r"nu \(smoothing\) must be > 0"),
    ("geometric_median", {"iters": 2.5}, "iters must be an integer >= 1"),
    ("trimmed_mean", {"beta": 0.6}, r"beta must lie in \[0, 0.5\], got 0.6"),
    ("breadcrumbs", {"beta": 0.5, "gamma": 0.5}, "beta \\+ gamma < 1"),
    ("breadcrumbs", {"gamma": -0.1}, r"must lie in \[0, 1\)"),
    ("krum", {"f": -1}, r"f \(number of Byzantine clients\) must be an integer >= 0"),
    ("multikrum", {"m": 0}, r"m \(clients to average\) must be an integer >= 1"),
    ("fisher", {"min_fisher": 0.0}, r"min_fisher must lie in \[1e-30, 1e30\], got 0.0"),
    ("fisher", {"min_fisher": -1.0}, "min_fisher must lie in"),
    ("hetero", {"floor": 0.0}, r"floor must lie in \[1e-12, 1e12\], got 0.0"),
    ("hetero", {"gamma": -1.0}, "gamma must be >= 0"),
    ("hetero", {"clip": "yes"}, "clip must be true or false"),
])
def test_invalid_param_values(method, kw, match):
    ex = {"extras": {"fisher": fis()}} if method == "fisher" else {}
    raises(f"merge method '{method}': .*{match}", method, tvs(), **ex, **kw)
    # the same check runs when a config is validated ahead of training
    with pytest.raises(MergeInputError, match=match):
        check_method_params(method, kw)


@pytest.mark.parametrize("method,k,kw,match", [
    ("krum", 4, {"f": 1}, r"needs more than 2f\+2 = 4 clients, got 4"),
    ("krum", 2, {"f": 0}, r"needs more than 2f\+2 = 2 clients, got 2"),
    ("multikrum", 6, {"f": 2}, r"needs more than 2f\+2 = 6 clients, got 6"),
    ("multikrum", 7, {"f": 1, "m": 7}, r"m=7 exceeds K - f = 6"),
    ("trimmed_mean", 4, {"beta": 0.5}, "drops 2 lowest and 2 highest of 4 values per coordinate"),
    ("trimmed_mean", 2, {"beta": 0.5}, "leaving none"),
])
def test_too_few_clients(method, k, kw, match):
    raises(f"merge method '{method}' with {k} clients: .*{match}", method, tvs(k), **kw)


def test_fisher_extras_validation():
    raises(r"merge method 'fisher' needs extras \['fisher'\]", "fisher", tvs())
    raises(r"needs extras \['fisher'\]", "fisher", tvs(), extras={})
    f = fis()
    raises(r"extras\['fisher'\] must hold one dict per client \(6\), got 5 entries", "fisher",
           tvs(), extras={"fisher": f[:5]})
    raises(r"must hold one dict per client", "fisher", tvs(), extras={"fisher": f[0]})
    f = fis()
    f[2]["w"] = torch.rand(2, 3)
    raises(r"client 2: extras\['fisher'\]\['w'\] has shape \(2, 3\), the task vector has \(3, 2\)",
           "fisher", tvs(), extras={"fisher": f})
    f = fis()
    del f[1]["b"]
    raises(r"client 1: extras\['fisher'\] keys differ", "fisher", tvs(), extras={"fisher": f})
    f = fis()
    f[3]["b"][0] = -1.0
    raises(r"client 3: extras\['fisher'\]\['b'\] has negative entries", "fisher", tvs(),
           extras={"fisher": f})
    f = fis()
    f[5]["w"][1, 1] = float("nan")
    raises(r"client 5: extras\['fisher'\]\['w'\] contains NaN or Inf", "fisher", tvs(),
           extras={"fisher": f})
    f = fis()
    f[0]["w"] = torch.ones(3, 2, dtype=torch.int64)
    raises("must be a floating-point tensor", "fisher", tvs(), extras={"fisher": f})
    raises(r"unknown extras \['fisherr'\]", "fedavg", tvs(), extras={"fisherr": fis()})
    # extras known to some method are validated but allowed for others
    out = merge("fedavg", tvs(), extras={"fisher": fis()})
    assert torch.allclose(out["w"], sum(t["w"] for t in tvs()) / 6)
    raises(r"client 0: extras\['fisher'\]\['b'\] has negative", "fedavg", tvs(),
           extras={"fisher": [{"w": torch.rand(3, 2), "b": -torch.ones(2)}] + fis(5)})


def test_errors_come_before_any_work(monkeypatch):
    """Validation happens before the method function is ever called."""
    import dataclasses

    import fl_merge.merging.registry as reg

    calls = []
    for name in ("krum", "fisher", "fednova", "ties", "median"):
        m = reg._METHODS[name]
        spy = dataclasses.replace(m, fn=lambda *a, **k: calls.append(a))
        monkeypatch.setitem(reg._METHODS, name, spy)
    bad = tvs()
    bad[5]["w"][0, 0] = float("nan")
    for args, kw in [(("krum", tvs(3)), {}), (("fisher", tvs()), {}), (("fednova", tvs()), {}),
                     (("ties", tvs()), {"density": 2.0}), (("median", bad), {})]:
        with pytest.raises(MergeInputError):
            merge(*args, **kw)
    assert calls == []


def test_device_not_available():
    if torch.cuda.is_available():
        pytest.skip("cuda present")
    raises("no CUDA device is available", "fedavg", tvs(), device="cuda")
