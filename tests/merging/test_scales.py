"""lambda <-> eta: each method's paper scale, checked against the papers' formulas written out
here by hand (not against the conversion function's own arithmetic)."""

import pytest
import torch

from fl_merge import apply_update, merge
from fl_merge.core.task_vectors import MergeInputError
from fl_merge.merging.scales import check_eta, check_lambda, eta_for_lambda, lambda_for_eta, lambda_scale
from fl_merge.methods import available_methods

THETA0 = {"w": torch.tensor([0.5, -1.0, 2.0, 0.0])}
# Signs agree on every coordinate, so TIES at density 1 elects them all and keeps every entry.
TAUS = [{"w": torch.tensor([1.0, -2.0, 0.5, 3.0])},
        {"w": torch.tensor([3.0, -1.0, 1.5, 1.0])},
        {"w": torch.tensor([2.0, -3.0, 1.0, 2.0])}]


def test_task_arithmetic_lambda_multiplies_the_sum():
    lam = 0.3
    eta = eta_for_lambda("task_arithmetic", lam, len(TAUS))
    got = apply_update(THETA0, merge("task_arithmetic", TAUS), eta)
    by_hand = THETA0["w"] + lam * (TAUS[0]["w"] + TAUS[1]["w"] + TAUS[2]["w"])  # Ilharco et al.
    torch.testing.assert_close(got["w"], by_hand)


def test_ties_lambda_multiplies_the_disjoint_mean():
    lam = 0.7
    eta = eta_for_lambda("ties", lam, len(TAUS), {"density": 1.0})
    got = apply_update(THETA0, merge("ties", TAUS, density=1.0), eta)
    # TIES (Yadav et al.): theta0 + lambda * tau_m, tau_m = mean of the agreeing entries (all here)
    tau_m = torch.tensor([2.0, -2.0, 1.0, 2.0])
    torch.testing.assert_close(got["w"], THETA0["w"] + lam * tau_m)


def test_dare_follows_its_base():
    assert lambda_scale("dare", {"base": "ties"}) == "delta"
    assert lambda_scale("dare") == "sum"  # default base fedavg: DARE + Task Arithmetic
    # drop_rate 0 keeps every entry: DARE-TIES is TIES, DARE-TA is Task Arithmetic.
    lam = 0.4
    got = apply_update(THETA0, merge("dare", TAUS, drop_rate=0.0, base="ties"),
                       eta_for_lambda("dare", lam, 3, {"drop_rate": 0.0, "base": "ties"}))
    torch.testing.assert_close(got["w"], THETA0["w"] + lam * torch.tensor([2.0, -2.0, 1.0, 2.0]))
    got = apply_update(THETA0, merge("dare", TAUS, drop_rate=0.0), eta_for_lambda("dare", lam, 3))
    torch.testing.assert_close(got["w"], THETA0["w"] + lam * sum(t["w"] for t in TAUS))


@pytest.mark.parametrize("method", available_methods())
def test_every_method_declares_a_scale_and_round_trips(method):
    assert lambda_scale(method) in ("sum", "delta")
    assert lambda_for_eta(method, eta_for_lambda(method, 0.25, 5), 5) == pytest.approx(0.25)


def test_only_ties_style_methods_and_model_stock_take_lambda_as_eta():
    """The built-ins' papers: TIES and Model Stock scale their own merged vector; Task
    Arithmetic, Breadcrumbs and every FL aggregator scale the sum (a new method file may
    declare either)."""
    delta = {m for m in available_methods() if lambda_scale(m) == "delta"}
    assert {"ties", "model_stock"} <= delta
    assert not delta & {"fedavg", "task_arithmetic", "fednova", "fedgma", "median", "trimmed_mean",
                        "cclip", "krum", "multikrum", "geometric_median", "fisher", "hetero",
                        "breadcrumbs", "dare"}


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="num_models must be at least 1"):
        eta_for_lambda("fedavg", 0.3, 0)
    with pytest.raises(ValueError, match="unknown"):
        eta_for_lambda("no-such-method", 0.3, 2)


@pytest.mark.parametrize("value, ok", [(0.3, 0.3), ("0.3", 0.3), (2, 2.0), (0, None), (-0.3, None),
                                       (float("inf"), None), (float("nan"), None), ("x", None),
                                       (True, None), (None, None)])
def test_a_lambda_is_a_positive_finite_number(value, ok):
    if ok is None:
        with pytest.raises(MergeInputError, match="^lambda"):
            check_lambda(value)
    else:
        assert check_lambda(value) == ok


@pytest.mark.parametrize("value, ok", [(0, 0.0), (1.5, 1.5), ("2", 2.0), (-1e-9, None), (float("inf"), None),
                                       (float("nan"), None), (False, None)])
def test_an_eta_is_a_finite_number_not_below_zero(value, ok):
    if ok is None:
        with pytest.raises(MergeInputError, match="^eta"):
            check_eta(value)
    else:
        assert check_eta(value) == ok
