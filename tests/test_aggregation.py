"""Each merge method against an independent reference (numpy / plain python), on
multi-tensor task vectors, uniform and weighted."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fl_merge.merging import streaming
from fl_merge.methods import merge

SHAPES = {"conv.weight": (4, 3, 3), "fc.weight": (5, 7), "fc.bias": (7,), "scale": ()}


def make_tvs(k, seed=0, shapes=SHAPES, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [
        {name: (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
         for name, shape in shapes.items()}
        for _ in range(k)
    ]


def flat(tv) -> np.ndarray:
    return np.concatenate([tv[k].double().numpy().reshape(-1) for k in SHAPES])


def stack(tvs) -> np.ndarray:
    return np.stack([flat(tv) for tv in tvs])


def unflat(vec: np.ndarray, shapes=SHAPES) -> dict:
    out, s = {}, 0
    for k, shp in shapes.items():
        n = int(np.prod(shp, dtype=int))
        out[k] = vec[s:s + n].reshape(shp)
        s += n
    return out


def assert_close(delta, ref_vec, rtol=1e-5, atol=1e-5):
    assert list(delta) == list(SHAPES)
    ref = unflat(np.asarray(ref_vec, dtype=np.float64))
    for k in SHAPES:
        assert tuple(delta[k].shape) == SHAPES[k]
        np.testing.assert_allclose(delta[k].double().numpy(), ref[k], rtol=rtol, atol=atol, err_msg=k)


def norm_p(w, k):
    if w is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum()


WEIGHTS = [None, [1.0, 3.0, 0.5, 2.0, 1.0, 4.0]]


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("method", ["fedavg", "task_arithmetic"])
def test_fedavg(method, w):
    tvs = make_tvs(6)
    x, p = stack(tvs), norm_p(w, 6)
    ref = sum(p[i] * x[i] for i in range(6))
    assert_close(merge(method, tvs, w), ref)


@pytest.mark.parametrize("w", WEIGHTS)
def test_fednova(w):
    tvs, a = make_tvs(6, 1), [1.0, 5.5, 2.0, 100.0, 3.0, 7.25]
    x, p = stack(tvs), norm_p(w, 6)
    a_eff = sum(p[i] * a[i] for i in range(6))
    ref = a_eff * sum(p[i] * x[i] / a[i] for i in range(6))
    assert_close(merge("fednova", tvs, w, normalisers=a), ref)
    # reported normalisers win over local steps
    assert_close(merge("fednova", tvs, w, [1] * 6, normalisers=a), ref)
    # local steps alone: the plain-SGD normaliser a_i = t_i, with a warning
    steps = [1, 5, 2, 10, 3, 7]
    with pytest.warns(UserWarning, match="plain-SGD normaliser"):
        out = merge("fednova", tvs, w, steps)
    assert_close(out, sum(p[i] * steps[i] for i in range(6)) * sum(p[i] * x[i] / steps[i] for i in range(6)))
    # equal normalisers: fednova is fedavg
    eq = merge("fednova", tvs, w, normalisers=[4.0] * 6)
    assert_close(eq, sum(p[i] * x[i] for i in range(6)))


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("w", WEIGHTS)
def test_fedgma(rho, w):
    tvs = make_tvs(6, 2)
    x, p = stack(tvs), norm_p(w, 6)
    ref = np.zeros(x.shape[1])
    for j in range(x.shape[1]):
        a = abs(sum(p[i] * np.sign(x[i, j]) for i in range(6)))
        m = 1.0 if a >= rho else a
        ref[j] = m * sum(p[i] * x[i, j] for i in range(6))
    out = merge("fedgma", tvs, w, rho=rho)
    assert_close(out, ref)
    if rho > 0:  # the mask really bites somewhere
        assert not np.allclose(flat(out), sum(p[i] * x[i] for i in range(6)))


@pytest.mark.parametrize("k", [1, 2, 5, 6, 8, 9])
def test_median_odd_and_even(k):
    tvs = make_tvs(k, 3)
    x = stack(tvs)
    ref = [float(np.median(x[:, j])) for j in range(x.shape[1])]
    # weights are ignored by design
    assert_close(merge("median", tvs, list(range(1, k + 1))), ref)


def test_median_even_is_mean_of_middle_values():
    tvs = [{"a": torch.tensor([v])} for v in (4.0, 1.0, 10.0, 2.0)]
    assert float(merge("median", tvs)["a"]) == 3.0


@pytest.mark.parametrize("k,beta", [(5, 0.2), (6, 0.25), (8, 0.3), (9, 0.45), (7, 0.5), (4, 0.1)])
def test_trimmed_mean(k, beta):
    tvs = make_tvs(k, 4)
    x = stack(tvs)
    t = int(beta * k)
    ref = [float(np.mean(sorted(x[:, j])[t:k - t])) for j in range(x.shape[1])]
    assert_close(merge("trimmed_mean", tvs, beta=beta), ref)


def ref_cclip(x, p, tau, iters, v0):
    v = v0.copy()
    for _ in range(iters):
        upd = np.zeros_like(v)
        for i in range(len(x)):
            d = np.linalg.norm(x[i] - v)
            upd += p[i] * (x[i] - v) * min(1.0, tau / d if d > 0 else 1.0)
        v = v + upd
    return v


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("tau,iters,center", [(1.0, 1, "zero"), (3.0, 3, "zero"), (0.5, 2, "mean"),
                                              (2.0, 1, "median"), (100.0, 1, "zero")])
def test_cclip(w, tau, iters, center):
    tvs = make_tvs(6, 5)
    x, p = stack(tvs), norm_p(w, 6)
    v0 = {"zero": np.zeros(x.shape[1]), "mean": p @ x, "median": np.median(x, axis=0)}[center]
    ref = ref_cclip(x, p, tau, iters, v0)
    assert_close(merge("cclip", tvs, w, tau=tau, iters=iters, center=center), ref)


def test_cclip_given_center_state_dict():
    tvs = make_tvs(5, 6)
    x, p = stack(tvs), norm_p(None, 5)
    c = make_tvs(1, 99)[0]
    ref = ref_cclip(x, p, 1.5, 2, flat(c))
    assert_close(merge("cclip", tvs, tau=1.5, iters=2, center=c), ref)


def ref_krum_scores(x, f):
    k = len(x)
    d = np.array([[float(np.sum((x[i] - x[j]) ** 2)) for j in range(k)] for i in range(k)])
    return [sum(sorted(d[i, j] for j in range(k) if j != i)[: k - f - 2]) for i in range(k)]


@pytest.mark.parametrize("k,f", [(5, 1), (7, 2), (8, 1), (4, 0)])
def test_krum(k, f):
    tvs = make_tvs(k, 7)
    x = stack(tvs)
    best = int(np.argmin(ref_krum_scores(x, f)))
    assert_close(merge("krum", tvs, f=f), x[best], rtol=0, atol=0)


@pytest.mark.parametrize("w", [None, [1, 2, 3, 4, 5, 6, 7]])
@pytest.mark.parametrize("f,m", [(1, None), (1, 3), (2, 1), (2, 5)])
def test_multikrum(w, f, m):
    k = 7
    tvs = make_tvs(k, 8)
    x, p = stack(tvs), norm_p(w, k)
    scores = ref_krum_scores(x, f)
    m_ = k - f if m is None else m
    sel = sorted(range(k), key=lambda i: scores[i])[:m_]
    ref = sum(p[i] * x[i] for i in sel) / sum(p[i] for i in sel)
    assert_close(merge("multikrum", tvs, w, f=f, m=m), ref)


def ref_weiszfeld(x, p, nu, iters):
    v = p @ x
    for _ in range(iters):
        b = np.array([p[i] / max(nu, np.linalg.norm(v - x[i])) for i in range(len(x))])
        v = (b[:, None] * x).sum(0) / b.sum()
    return v


@pytest.mark.parametrize("w", WEIGHTS)
def test_geometric_median(w):
    tvs = make_tvs(6, 9)
    x, p = stack(tvs), norm_p(w, 6)
    ref = ref_weiszfeld(x, p, 1e-6, 10)
    out = merge("geometric_median", tvs, w)
    assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # and it (nearly) minimises sum p_i ||v - tau_i||: better than the mean and every client
    obj = lambda v: sum(p[i] * np.linalg.norm(v - x[i]) for i in range(6))  # noqa: E731
    v = flat(out)
    assert obj(v) < obj(p @ x) - 1e-3
    assert all(obj(v) < obj(x[i]) for i in range(6))
    converged = ref_weiszfeld(x, p, 1e-6, 500)
    assert obj(v) - obj(converged) < 1e-3 * obj(converged)


def ref_ties(x, p, density):
    k, n = x.shape
    cnt = max(1, int(density * n))
    trimmed = np.zeros_like(x)
    for i in range(k):
        thr = sorted(np.abs(x[i]), reverse=True)[cnt - 1]
        trimmed[i] = np.where(np.abs(x[i]) >= thr, x[i], 0.0)
    signs = [np.sign(sum(p[i] * trimmed[i, j] for i in range(k))) for j in range(n)]
    majority = np.sign(sum(signs))  # breaks exact ties, as the TIES reference code does
    out = np.zeros(n)
    for j in range(n):
        s = signs[j] if signs[j] != 0 else (majority if majority != 0 else -1.0)
        agree = [i for i in range(k) if np.sign(trimmed[i, j]) == s]
        if agree:
            out[j] = sum(p[i] * trimmed[i, j] for i in agree) / sum(p[i] for i in agree)
    return out


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_ties(w, density):
    tvs = make_tvs(6, 10)
    x, p = stack(tvs), norm_p(w, 6)
    assert_close(merge("ties", tvs, w, density=density), ref_ties(x, p, density))


def test_ties_topk_is_global_across_tensors():
    # client 0's big entries all sit in one tensor: a per-tensor top-k would keep entries of
    # the other tensors too, the global one must not.
    tvs = make_tvs(1, 11, scale=1e-3)
    tvs[0]["fc.weight"] += 10.0
    out = merge("ties", tvs, density=35 / flat(tvs[0]).size)
    assert int((out["fc.weight"] != 0).sum()) == 35
    assert all(int((out[k] != 0).sum()) == 0 for k in SHAPES if k != "fc.weight")


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
    fed = merge("fedavg", tvs)["b"]
    assert float((avg - fed).abs().mean()) < 0.1 * float(fed.abs().mean())


def test_dare_ties_base_matches_reference_on_dropped_vectors():
    tvs = make_tvs(4, 13)
    names = ["alpha", "beta", "gamma", "delta"]
    # recover the DARE masks from a single-client fedavg run per client (masks are keyed by
    # the client's name, so client i alone under its name gets the same mask)
    dropped = [flat(merge("dare", [tvs[i]], names=[names[i]], drop_rate=0.4, seed=5))
               for i in range(4)]
    x, p = np.stack(dropped), norm_p(None, 4)
    ref = ref_ties(x, p, 0.5)
    assert_close(merge("dare", tvs, names=names, drop_rate=0.4, seed=5, base="ties", density=0.5),
                 ref, rtol=1e-4, atol=1e-5)


def ref_breadcrumbs(tvs, p, beta, gamma):
    out = {}
    for key, shp in SHAPES.items():
        acc = np.zeros(int(np.prod(shp, dtype=int)))
        for i, tv in enumerate(tvs):
            v = tv[key].double().numpy().reshape(-1)
            n = v.size
            rank = np.empty(n, dtype=int)
            rank[np.argsort(np.abs(v), kind="stable")] = np.arange(n)
            keep = (rank >= int(gamma * n)) & (rank < n - int(beta * n))
            acc += p[i] * np.where(keep, v, 0.0)
        out[key] = acc
    return np.concatenate([out[k] for k in SHAPES])


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("beta,gamma", [(0.01, 0.85), (0.1, 0.3), (0.0, 0.5), (0.2, 0.0), (0.0, 0.0)])
def test_breadcrumbs(w, beta, gamma):
    tvs = make_tvs(6, 14)
    p = norm_p(w, 6)
    assert_close(merge("breadcrumbs", tvs, w, beta=beta, gamma=gamma),
                 ref_breadcrumbs(tvs, p, beta, gamma))


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


def ref_hetero(x, p, steps, gamma, clip, floor=0.01):
    k = len(x)
    s = np.ones(k) if steps is None else np.asarray(steps, dtype=float)  # normalisers a_i
    u = x / s[:, None]
    n = np.linalg.norm(u, axis=1)
    r = np.median(n) if k % 2 else np.sort(n)[k // 2 - 1]  # torch.median: lower middle
    c = np.minimum(1.0, r / n) if clip else np.ones(k)
    z = u * c[:, None]
    cos = np.zeros(k)
    for i in range(k):
        m = sum(p[j] * z[j] for j in range(k) if j != i) / sum(p[j] for j in range(k) if j != i)
        cos[i] = z[i] @ m / (np.linalg.norm(z[i]) * np.linalg.norm(m))
    q = p * (np.minimum(np.maximum(cos, 0), 1) ** gamma + floor)
    q = q / q.sum()
    scale = 1.0 if steps is None else float(p @ s)
    return scale * (q[:, None] * z).sum(0), cos


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("steps", [None, [1, 5, 2, 10, 3, 7]])
@pytest.mark.parametrize("gamma,clip", [(1.0, True), (2.0, False), (0.0, True)])
def test_hetero(w, steps, gamma, clip):
    tvs = make_tvs(6, 16)
    # give them a common direction plus one sign-flipped client so cosines differ
    common = make_tvs(1, 17)[0]
    for i, tv in enumerate(tvs):
        for k in tv:
            tv[k] = tv[k] * 0.5 + (3.0 if i != 4 else -3.0) * common[k] * (i + 1)
    x, p = stack(tvs), norm_p(w, 6)
    ref, cos = ref_hetero(x, p, steps, gamma, clip)
    assert cos[4] < 0 < min(np.delete(cos, 4))
    # normalisers as the clients report them; local steps alone are the plain-SGD fallback
    assert_close(merge("hetero", tvs, w, normalisers=steps, gamma=gamma, clip=clip), ref,
                 rtol=1e-4, atol=1e-4)
    if steps is not None:
        with pytest.warns(UserWarning, match="FedNova normaliser missing"):
            out = merge("hetero", tvs, w, steps, gamma=gamma, clip=clip)
        assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,kw", [
    ("fedavg", {}), ("median", {}), ("trimmed_mean", {"beta": 0.25}), ("fedgma", {"rho": 0.4}),
    ("cclip", {"tau": 2.0, "iters": 3}), ("krum", {}), ("multikrum", {"m": 3}),
    ("geometric_median", {}), ("ties", {"density": 0.3}), ("hetero", {}),
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
    from fl_merge.methods import get_method

    tvs, w, a = make_tvs(5, 20), [1.0, 2.0, 3.0, 1.0, 0.5], [3.0, 1.0, 4.5, 1.0, 5.2]
    out = merge(method, tvs, w, normalisers=a)
    p = normalized_weights(w, 5).float()
    extra = {"normalisers": torch.tensor(a, dtype=torch.float64)} if method == "fednova" else {}
    for k in SHAPES:
        stacked = torch.stack([tv[k].reshape(-1) for tv in tvs])
        ref = get_method(method).fn(stacked, p, **extra).reshape(SHAPES[k])
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-6)
