"""RegMean against its definition solved by numpy's least squares on the stacked inputs:
W = argmin_W sum_i p_i ||X_i W^T - X_i W_i^T||^2 (np.linalg.lstsq), the off-diagonal scaling
alpha written as extra rows; and the checks of the Gram matrices the clients send."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.core.task_vectors import MergeInputError
from fl_merge.methods import merge
from methods.helpers import SHAPES, assert_close, assert_refused, flat, make_tvs, norm_p, stack

K, D_IN = 4, SHAPES["fc.weight"][1]  # fc.weight [5, 7]: the one linear weight with a Gram


def inputs(k=K, rows=(30, 12, 50, 9), seed=3, dead=()):
    """Each client's inputs X_i [N_i, d_in] to the layer (columns `dead` always 0)."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, D_IN)) * rng.uniform(0.2, 3.0, size=D_IN) + rng.normal(size=D_IN)
          for n in rows[:k]]
    for x in xs:
        x[:, list(dead)] = 0.0
    return xs


def grams(xs, mean=False):
    return [{"fc.weight": torch.tensor(x.T @ x / (len(x) if mean else 1.0))} for x in xs]


def lstsq_reference(tvs, xs, p, alpha):
    """Delta by np.linalg.lstsq: client i contributes rows sqrt(p_i) [sqrt(alpha) X_i; D_i]
    with targets the same rows times tau_i^T, D_i = diag(sqrt((1 - alpha) diag(X_i^T X_i))):
    their normal equations are sum_i p_i G~_i, G~ = alpha G + (1 - alpha) diag(G) (RegMean's
    off-diagonal scaling); theta0 cancels. Every other tensor: sum_i p_i tau_i."""
    rows, targets = [], []
    for tv, x, w in zip(tvs, xs, p):
        d = np.diag(np.sqrt((1 - alpha) * (x * x).sum(0)))
        a = np.sqrt(w) * np.vstack([np.sqrt(alpha) * x, d])
        rows.append(a)
        targets.append(a @ tv["fc.weight"].double().numpy().T)
    fit = np.linalg.lstsq(np.vstack(rows), np.vstack(targets), rcond=None)[0].T
    ref = p @ stack(tvs)
    start = sum(int(np.prod(SHAPES[k])) for k in list(SHAPES)[:list(SHAPES).index("fc.weight")])
    ref[start:start + fit.size] = fit.reshape(-1)
    return ref


@pytest.mark.parametrize("w", [None, [1.0, 3.0, 0.5, 2.0]])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1, 0.0])
def test_regmean_is_the_least_squares_fit(w, alpha):
    tvs, xs = make_tvs(K, 21), inputs()
    ref = lstsq_reference(tvs, xs, norm_p(w, K), alpha)
    assert_close(merge("regmean", tvs, w, extras={"gram": grams(xs)}, alpha=alpha, ridge=0.0), ref)
    # the default ridge (1e-6 of the mean diagonal) changes a well-conditioned solve by ~1e-6
    assert_close(merge("regmean", tvs, w, extras={"gram": grams(xs)}, alpha=alpha), ref, rtol=1e-4)


def test_row_means_with_num_examples_weights_are_the_papers_sums():
    """Clients send X^T X / N_i; weights N_i give back the paper's unweighted sum of squares."""
    tvs, xs = make_tvs(K, 22), inputs()
    n = [float(len(x)) for x in xs]
    ref = lstsq_reference(tvs, xs, np.full(K, 1.0), 1.0)
    got = merge("regmean", tvs, n, extras={"gram": grams(xs, mean=True)}, alpha=1.0, ridge=0.0)
    fc = slice(36, 71)  # fc.weight's coordinates (after conv.weight's 36)
    np.testing.assert_allclose(flat(got)[fc], ref[fc], rtol=1e-5, atol=1e-5)


def test_a_feature_no_client_activates_keeps_the_mean_update():
    tvs, xs = make_tvs(K, 23), inputs(dead=(2, 5))
    got = merge("regmean", tvs, extras={"gram": grams(xs)}, alpha=1.0)["fc.weight"].double().numpy()
    mean = np.mean([tv["fc.weight"].double().numpy() for tv in tvs], axis=0)
    np.testing.assert_allclose(got[:, [2, 5]], mean[:, [2, 5]], rtol=1e-6, atol=1e-6)
    live = [j for j in range(D_IN) if j not in (2, 5)]  # there: the fit on the live features
    a = np.vstack([x[:, live] for x in xs])
    y = np.vstack([x[:, live] @ tv["fc.weight"].double().numpy()[:, live].T for x, tv in zip(xs, tvs)])
    np.testing.assert_allclose(got[:, live], np.linalg.lstsq(a, y, rcond=None)[0].T, rtol=1e-4, atol=1e-5)
    with pytest.raises(MergeInputError, match=r"summed Gram matrix of 'fc.weight' is singular .*use ridge > 0"):
        merge("regmean", tvs, extras={"gram": grams(xs)}, alpha=1.0, ridge=0.0)


def test_one_client_and_a_two_by_two_by_hand():
    tv = make_tvs(1, 24)
    out = merge("regmean", tv, extras={"gram": grams(inputs(1))})
    torch.testing.assert_close(out["fc.weight"], tv[0]["fc.weight"], rtol=1e-5, atol=1e-6)
    # d_in = 1 (a scalar Gram): Delta = (g1 t1 + g2 t2) / (g1 + g2) = (1 * 2 + 3 * 6) / 4 = 5
    tvs = [{"w": torch.tensor([[2.0]])}, {"w": torch.tensor([[6.0]])}]
    g = [{"w": torch.tensor([[1.0]])}, {"w": torch.tensor([[3.0]])}]
    assert merge("regmean", tvs, extras={"gram": g}, ridge=0.0)["w"].item() == pytest.approx(5.0)


def test_weights_without_grams_are_averaged():
    """Every tensor no client sent a Gram for is the mean (biases, convolutions; all of them
    when the Grams cover nothing, as `fl-merge merge` calls it on such a tensor alone)."""
    tvs = make_tvs(K, 27)
    assert_close(merge("regmean", tvs, extras={"gram": [{} for _ in range(K)]}), stack(tvs).mean(0))


def _bad(fix):
    g = grams(inputs())
    fix(g)
    return g


@pytest.mark.parametrize("gram,match", [
    (None, r"merge method 'regmean' needs extras \['gram'\]"),
    (lambda g: g[1].clear(), r"client 1: extras\['gram'\] covers other weights than client 0's: \['fc.weight'\]"),
    (lambda g: g[2].update({"fc.weight": torch.eye(5)}),
     r"client 2: extras\['gram'\]\['fc.weight'\] has shape \(5, 5\), the weight \(5, 7\) needs \(7, 7\)"),
    (lambda g: g[0].update({"fc.bias": torch.eye(7)}),
     r"client 0: extras\['gram'\]\['fc.bias'\] is for a weight of shape \(7,\); Gram matrices are for 2-D"),
    (lambda g: g[3].update({"nope": torch.eye(7)}), r"client 3: extras\['gram'\] has \['nope'\], which are not"),
    (lambda g: [x.update({"out.weight": torch.eye(5)}) for x in g[:2]],
     r"client 2: extras\['gram'\] covers other weights than client 0's: \['out.weight'\]"),
    (lambda g: g[1]["fc.weight"].__setitem__((0, 1), 1e9), r"client 1: extras\['gram'\]\['fc.weight'\] is not symmetric"),
    (lambda g: g[1]["fc.weight"].__setitem__((3, 3), -1.0), r"client 1: .* has a negative diagonal entry"),
    (lambda g: g[2]["fc.weight"].__setitem__((4, 4), float("nan")), r"client 2: .* contains NaN or Inf"),
    (lambda g: g[0].update({"fc.weight": 2 * torch.ones(7, 7, dtype=torch.float64) - torch.eye(7)}),
     r"client 0: .* is not a Gram matrix \(an entry exceeds sqrt\(G_jj G_kk\)\)"),
    (lambda g: g[0].update({"fc.weight": g[0]["fc.weight"].long()}), r"must be a floating-point tensor"),
])
def test_bad_gram_matrices_are_refused(gram, match):
    extras = None if gram is None else {"gram": _bad(gram)}
    with pytest.raises(MergeInputError, match=match):
        merge("regmean", make_tvs(K, 25, shapes={**SHAPES, "out.weight": (2, 5)}), extras=extras)


@pytest.mark.parametrize("kw,match", [
    ({"alpha": 1.5}, r"alpha must lie in \[0, 1\], got 1.5"),
    ({"ridge": -1e-3}, r"ridge must lie in \[0, 1\]"),
])
def test_invalid_parameters_are_refused(kw, match):
    assert_refused("regmean", kw, match)  # before any Gram is looked at
