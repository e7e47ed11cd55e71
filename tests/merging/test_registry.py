"""The registry's contract: bad input gets one clear MergeInputError before any arithmetic, a
method's declarations are checked when it registers, and per-client arguments a method
does not use are ignored."""

from __future__ import annotations

import pytest
import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.methods import merge
from methods.helpers import small_fisher, small_tvs


def raises(match, *args, **kw):
    with pytest.raises(MergeInputError, match=match):
        merge(*args, **kw)


def test_unknown_method_and_param():
    raises("unknown merge method 'nope'", "nope", small_tvs())
    raises(r"unknown parameter\(s\) \['densty'\] for merge method 'ties'", "ties", small_tvs(), densty=0.1)
    raises(r"unknown parameter", "median", small_tvs(), beta=0.1)


def test_task_vectors_must_match():
    t = small_tvs()
    t[2] = {"w": t[2]["w"]}
    raises("client 2 has different parameters", "fedavg", t)
    t = small_tvs()
    t[3]["w"] = torch.randn(2, 3)
    raises(r"client 3: parameter 'w' has shape \(2, 3\)", "median", t)
    t = small_tvs()
    t[1]["b"] = t[1]["b"].double()
    raises("client 1: parameter 'b' has dtype torch.float64", "krum", t)
    t = small_tvs()
    t[4]["w"][0, 0] = float("nan")
    raises("bob: update of 'w' contains NaN or Inf", "geometric_median", t,
           names=["a", "b", "c", "d", "bob", "f"])
    t = small_tvs()
    t[0]["b"][1] = float("inf")
    raises("client 0: update of 'b' contains NaN or Inf", "ties", t)
    raises("no task vectors", "fedavg", [])


def _bad_inputs():
    t = small_tvs(); t[2] = {"w": t[2]["w"]}; yield t, None  # noqa: E702
    t = small_tvs(); t[3]["w"] = torch.randn(2, 3); yield t, None  # noqa: E702
    t = small_tvs(); t[1]["b"] = t[1]["b"].double(); yield t, None  # noqa: E702
    t = small_tvs(); t[1]["b"] = torch.ones(2, dtype=torch.int64); yield t, None  # noqa: E702
    t = small_tvs(); t[4]["w"][0, 0] = float("nan"); yield t, list("abcdef")  # noqa: E702
    t = small_tvs(); t[0]["b"][1] = -float("inf"); yield t, None  # noqa: E702
    t = small_tvs(); t[0]["w"] = [1.0]; yield t, None  # noqa: E702
    yield small_tvs(), ["x"]
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
    raises("3 weights for 6 task vectors", "fedavg", small_tvs(), [1, 2, 3])
    raises("weights must be finite, non-negative", "fedavg", small_tvs(), [1, -1, 1, 1, 1, 1])
    raises("needs every client's local_steps", "fednova", small_tvs())
    raises("local_steps must be 6 positive numbers", "fednova", small_tvs(), local_steps=[1, 2, 0, 1, 1, 1])
    raises("local_steps must be 6 positive numbers", "hetero", small_tvs(), local_steps=[1, 2])
    raises("needs every client's local_steps or normalisers", "fednova", small_tvs(), normalisers=[None] * 6)
    raises("2 normalisers for 6 task vectors", "fednova", small_tvs(), normalisers=[1.0, 2.0])
    raises(r"normalisers must be 6 positive numbers \(None for a client without one\), got -1 for client 2",
           "fednova", small_tvs(), normalisers=[1, 1, -1, 1, 1, 1])
    raises("normalisers must be 6 positive numbers", "hetero", small_tvs(), normalisers="abc")
    raises("normalisers must be 6 positive numbers", "fedavg", small_tvs(), normalisers=[True] * 6)
    raises("c3 has no normaliser and there are no local_steps to fall back on", "fednova", small_tvs(),
           normalisers=[1, 1, 1, None, 1, 1], names=[f"c{i}" for i in range(6)])


def test_fisher_extras_validation():
    raises(r"merge method 'fisher' needs extras \['fisher'\]", "fisher", small_tvs())
    raises(r"needs extras \['fisher'\]", "fisher", small_tvs(), extras={})
    f = small_fisher()
    raises(r"extras\['fisher'\] must hold one dict per client \(6\), got 5 entries", "fisher",
           small_tvs(), extras={"fisher": f[:5]})
    raises(r"must hold one dict per client", "fisher", small_tvs(), extras={"fisher": f[0]})
    f = small_fisher()
    f[2]["w"] = torch.rand(2, 3)
    raises(r"client 2: extras\['fisher'\]\['w'\] has shape \(2, 3\), the task vector has \(3, 2\)",
           "fisher", small_tvs(), extras={"fisher": f})
    f = small_fisher()
    del f[1]["b"]
    raises(r"client 1: extras\['fisher'\] keys differ", "fisher", small_tvs(), extras={"fisher": f})
    f = small_fisher()
    f[3]["b"][0] = -1.0
    raises(r"client 3: extras\['fisher'\]\['b'\] has negative entries", "fisher", small_tvs(),
           extras={"fisher": f})
    f = small_fisher()
    f[5]["w"][1, 1] = float("nan")
    raises(r"client 5: extras\['fisher'\]\['w'\] contains NaN or Inf", "fisher", small_tvs(),
           extras={"fisher": f})
    f = small_fisher()
    f[0]["w"] = torch.ones(3, 2, dtype=torch.int64)
    raises("must be a floating-point tensor", "fisher", small_tvs(), extras={"fisher": f})
    raises(r"unknown extras \['fisherr'\]", "fedavg", small_tvs(), extras={"fisherr": small_fisher()})
    # extras known to some method are validated but allowed for others
    out = merge("fedavg", small_tvs(), extras={"fisher": small_fisher()})
    assert torch.allclose(out["w"], sum(t["w"] for t in small_tvs()) / 6)
    raises(r"client 0: extras\['fisher'\]\['b'\] has negative", "fedavg", small_tvs(),
           extras={"fisher": [{"w": torch.rand(3, 2), "b": -torch.ones(2)}] + small_fisher(5)})


def test_errors_come_before_any_work(monkeypatch):
    """Validation happens before the method function is ever called."""
    import dataclasses

    import fl_merge.merging.registry as reg

    calls = []
    for name in ("krum", "fisher", "fednova", "ties", "median"):
        m = reg._METHODS[name]
        spy = dataclasses.replace(m, fn=lambda *a, **k: calls.append(a))
        monkeypatch.setitem(reg._METHODS, name, spy)
    bad = small_tvs()
    bad[5]["w"][0, 0] = float("nan")
    for args, kw in [(("krum", small_tvs(3)), {}), (("fisher", small_tvs()), {}),
                     (("fednova", small_tvs()), {}),
                     (("ties", small_tvs()), {"density": 2.0}), (("median", bad), {})]:
        with pytest.raises(MergeInputError):
            merge(*args, **kw)
    assert calls == []


def test_device_not_available():
    if torch.cuda.is_available():
        pytest.skip("cuda present")
    raises("no CUDA device is available", "fedavg", small_tvs(), device="cuda")


def test_methods_without_normalisers_ignore_them_silently():
    import warnings

    tvs = [{"w": torch.ones(2) * i} for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning for a method that has no use
        out = merge("fedavg", tvs, local_steps=[1, 2, 3], normalisers=[None, 4.0, None])
    assert out["w"].tolist() == [1.0, 1.0]


@pytest.fixture
def scratch_registry():
    """Registrations a test makes stay in the test."""
    import fl_merge.merging.registry as reg

    saved = dict(reg._METHODS)
    yield reg
    reg._METHODS.clear()
    reg._METHODS.update(saved)


def _mean(stacked, weights, alpha: float = 1.0):
    return alpha * (weights.to(stacked.dtype) @ stacked)


def test_declarations_are_checked_when_a_method_registers(scratch_registry):
    reg = scratch_registry
    with pytest.raises(ValueError, match=r"search space for \['beta'\], which are not its parameters"):
        reg.register("m1", coordinatewise=True, space={"beta": (1, 2)})(_mean)
    with pytest.raises(ValueError, match="the space of alpha must be a non-empty tuple"):
        reg.register("m2", coordinatewise=True, space={"alpha": ()})(_mean)
    with pytest.raises(ValueError, match="needs extras but takes no 'extras' argument"):
        reg.register("m3", coordinatewise=True, needs=reg.Needs(extras=("fisher",)))(_mean)
    with pytest.raises(ValueError, match="needs must be a Needs"):
        reg.register("m4", coordinatewise=True, needs="local_steps")(_mean)
    # theta0 (the base model) only reaches whole-vector methods that take it
    with pytest.raises(ValueError, match="needs theta0: it must be whole-vector and take a 'theta0'"):
        reg.register("m4b", coordinatewise=False, needs=reg.Needs(theta0=True))(
            lambda task_vectors, weights: task_vectors[0])
    with pytest.raises(ValueError, match="needs theta0: it must be whole-vector"):
        reg.register("m4c", coordinatewise=True, needs=reg.Needs(theta0=True))(
            lambda stacked, weights, theta0=None: stacked[0])
    assert not {"m1", "m2", "m3", "m4", "m4b", "m4c"} & set(reg.available_methods())


def test_theta0_reaches_the_methods_that_take_it(scratch_registry):
    import torch
    reg = scratch_registry
    reg.register("m4d", coordinatewise=False, needs=reg.Needs(theta0=True))(
        lambda task_vectors, weights, theta0: {k: theta0[k] + v for k, v in task_vectors[0].items()})
    out = reg.merge("m4d", [{"w": torch.ones(2)}], theta0={"w": torch.full((2,), 3.0)})
    assert out["w"].tolist() == [4.0, 4.0]
    assert reg.get_method("m4d").needs.describe() == ""  # not something clients send
    # methods that do not take it ignore it
    assert reg.merge("fedavg", [{"w": torch.ones(2)}], theta0="junk")["w"].tolist() == [1.0, 1.0]


def test_declarations_are_read_back_for_the_method_and_its_aliases(scratch_registry):
    from fl_merge.merging.search import declare_space, knob_grids

    reg = scratch_registry
    reg.register("m5", coordinatewise=True, aliases=("m5_alias",), space={"alpha": [0.5, 1.0]},
                 needs=reg.Needs(local_steps=True), paper="A. Author 2020")(_mean)
    for name in ("m5", "m5_alias"):
        m = reg.get_method(name)
        assert m.params == {"alpha": 1.0} and m.space == {"alpha": (0.5, 1.0)}
        assert m.needs_local_steps and not m.needs_normalisers and m.needs_extras == ()
        assert m.paper == reg.Paper("A. Author 2020") and m.aliases == ("m5_alias",)
        assert reg.is_per_tensor_exact(name)  # coordinate-wise: per tensor is the method
    declare_space("m5", alpha=(2.0,))  # sets the same field, for the alias too
    assert knob_grids("m5_alias", {}) == {"alpha": (2.0,)}
    reg.register("m6", coordinatewise=False,
                 per_tensor_exact=lambda params: params["alpha"] > 0)(
        lambda task_vectors, weights, alpha=1.0: task_vectors[0])
    assert reg.is_per_tensor_exact("m6") and not reg.is_per_tensor_exact("m6", {"alpha": -1.0})


def test_a_registered_function_registers_again_under_another_name(scratch_registry):
    reg = scratch_registry
    assert reg.register_again("m7", _mean) is False  # not registered: nothing happens
    assert "m7" not in reg.available_methods()
    reg.register("m8", coordinatewise=True, space={"alpha": (0.5,)}, lambda_scale="delta")(_mean)
    assert reg.register_again("m7", _mean) is True
    m = reg.get_method("m7")
    assert (m.name, m.space, m.lambda_scale, m.fn) == ("m7", {"alpha": (0.5,)}, "delta", _mean)
    with pytest.raises(ValueError, match="'m8' registered twice"):
        reg.register_again("m8", _mean)


def test_a_global_pass_is_declared_checked_and_its_stats_reach_the_method(scratch_registry):
    """A method reading one global number (here: the largest |tau| over the whole update)
    declares its pass; merged on any part with the pass's stats it is that part of the
    whole merge, without them each part would use its own maximum."""
    import torch
    from fl_merge.merging.passes import global_statistics, has_global_pass
    reg = scratch_registry

    def largest(task_vectors, weights, device, params):
        return max(float(v.abs().max()) for tv in task_vectors for v in tv.values())

    def normalised_mean(task_vectors, weights, stats=None):
        top = largest(task_vectors, weights, None, {}) if stats is None else stats
        return {k: sum(p * tv[k] for p, tv in zip(weights, task_vectors)) / top for k in task_vectors[0]}

    with pytest.raises(ValueError, match="declares a global_pass: it must be whole-vector, not personal, "
                                         "and take a 'stats' argument"):
        reg.register("m9", coordinatewise=False, global_pass=largest)(lambda task_vectors, weights: {})
    with pytest.raises(ValueError, match="declares a global_pass"):
        reg.register("m9", coordinatewise=True, global_pass=largest)(lambda stacked, weights, stats=None: stacked[0])
    reg.register("m10", coordinatewise=False, global_pass=largest)(normalised_mean)
    assert has_global_pass("m10") and "stats" not in reg.get_method("m10").params
    tvs = [{"a": torch.tensor([1.0, -8.0]), "b": torch.tensor([2.0])},
           {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([-2.0])}]
    stats = global_statistics("m10", tvs, [1.0, 3.0])
    assert stats == 8.0
    part = reg.merge("m10", [{"b": tv["b"]} for tv in tvs], [1.0, 3.0], stats=stats)
    assert part["b"].tolist() == [(0.25 * 2.0 - 0.75 * 2.0) / 8.0]
    assert reg.merge("m10", [{"b": tv["b"]} for tv in tvs], [1.0, 3.0])["b"].tolist() == [-0.5]
