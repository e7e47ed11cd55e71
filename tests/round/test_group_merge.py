"""Large-model rounds: Deltas merged group by group and kept on disk
(fl_merge/round/group_merge.py), theta0 in the round's store, the merged model read one tensor
at a time (fl_merge.core.task_vectors.UpdatedState)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.core.task_vectors import UpdatedState
from fl_merge.io.spill import JoinedState, MappedState, SpillDir
from fl_merge.methods import merge
from fl_merge.round import group_merge
from fl_merge.round.chunks import tensor_bytes
from fl_merge.round.group_merge import groupable, merge_in_groups
from fl_merge.round.merging import merge_methods
from fl_merge.round.outcome import new_round
from fl_merge.round.settings import RoundSettings
from fl_merge.round.updates import ClientUpdate

SHAPES = {"a.w": (6, 5), "a.b": (6,), "b.w": (4, 6), "b.b": (4,), "c.w": (3, 4)}
LIMIT = 6 * 5 * 4 + 6 * 4  # a.w and a.b fit one group, then b.w alone, ...


def _tvs(k: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g) for n, s in SHAPES.items()} for _ in range(k)]


def _clients(k: int, extras: list[dict] | None = None) -> list[ClientUpdate]:
    return [ClientUpdate(i, {"num-examples": 10 * (i + 1), "partition-id": i}, {},
                         extras=(extras[i] if extras else {})) for i in range(k)]


def test_fedavg_in_groups_is_the_weighted_mean_written_out_and_lives_on_disk(tmp_path):
    tvs = _tvs()
    store = SpillDir(tmp_path)
    deltas = merge_methods({"fedavg": ("fedavg", {})}, _clients(3), tvs, "num-examples", store=store,
                           group_bytes=LIMIT)
    d = deltas["fedavg"]
    assert isinstance(d, JoinedState) and list(d) == list(SHAPES)
    w = np.array([10.0, 20.0, 30.0]) / 60.0
    for n in SHAPES:
        want = sum(wi * t[n].double().numpy() for wi, t in zip(w, tvs))
        np.testing.assert_allclose(d[n].numpy(), want, rtol=1e-6, atol=1e-6)
    files = sorted(store.path.iterdir())
    assert len(files) == 3  # float32 bytes: {a.w 120, a.b 24}, {b.w 96, b.b 16}, {c.w 48} at LIMIT 144
    for f in files:
        part = MappedState(f)
        assert sum(tensor_bytes(part[k]) for k in part) <= LIMIT


@pytest.mark.parametrize("method,params", [
    ("ties", {"convention": "mergekit"}), ("dare", {}), ("breadcrumbs", {}), ("tsv_m", {}),
    ("median", {})])
def test_a_per_tensor_method_in_groups_equals_the_method_on_the_whole_update(tmp_path, method, params):
    tvs = _tvs(4, seed=1)
    assert groupable(method, params)
    names = [f"client-{i}" for i in range(4)]
    whole = merge(method, tvs, names=names, **params)
    grouped = merge_in_groups(lambda t, e, b: merge(method, t, names=names, **params), tvs, None, None,
                              LIMIT, SpillDir(tmp_path), method)
    for n in SHAPES:
        assert torch.equal(grouped[n], whole[n]), n


def test_regmean_in_groups_takes_each_groups_gram_matrices(tmp_path):
    tvs = _tvs(2, seed=2)
    g = torch.Generator().manual_seed(3)
    grams = []
    for _ in range(2):
        per = {}
        for n, s in SHAPES.items():
            if len(s) == 2:
                x = torch.randn(20, s[1], generator=g)
                per[n] = x.T @ x / 20
        grams.append(per)
    clients = _clients(2, [{"gram": gm} for gm in grams])
    grouped = merge_methods({"regmean": ("regmean", {})}, clients, tvs, "uniform", store=SpillDir(tmp_path),
                            group_bytes=LIMIT)["regmean"]
    # RegMean per weight W = (sum_i G_i)^-1 sum_i G_i W_i in the [in, out] layout, written out
    alpha = 0.1  # the method's default off-diagonal scale (ridge 1e-6: below the tolerance)
    for n, s in SHAPES.items():
        if len(s) != 2:
            want = (tvs[0][n] + tvs[1][n]).double().numpy() / 2
        else:
            gs = [gm[n].double().numpy() for gm in grams]
            gs = [alpha * x + (1 - alpha) * np.diag(np.diag(x)) for x in gs]
            want = np.linalg.solve(sum(gs), sum(gi @ t[n].double().numpy().T for gi, t in zip(gs, tvs))).T
        np.testing.assert_allclose(grouped[n].numpy(), want, rtol=1e-4, atol=1e-5)


def test_a_whole_update_method_is_merged_whole_then_kept_on_disk(tmp_path, monkeypatch):
    tvs = _tvs(3, seed=4)
    m = "hetero"  # its norms and cosines need the whole update: without its pass, merged whole
    monkeypatch.setattr(group_merge, "has_global_pass", lambda *a: False)
    assert not groupable(m, {})
    store = SpillDir(tmp_path)
    kept = merge_methods({m: (m, {})}, _clients(3), tvs, "uniform", store=store, group_bytes=LIMIT)[m]
    assert isinstance(kept, MappedState) and kept.path.parent == store.path
    want = merge(m, tvs, names=[f"client {i}" for i in range(3)])
    for n in SHAPES:
        assert torch.equal(kept[n], want[n])


def test_groupable_says_no_to_personal_methods():
    assert groupable("fedavg", {}) and groupable("hetero", {})
    assert not groupable("emr", {})


def test_updated_state_is_theta0_plus_eta_delta_per_tensor_in_the_base_dtype():
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(4, 3, generator=g).half(), "n": torch.tensor([3])}
    delta = {"w": torch.randn(4, 3, generator=g)}
    got = UpdatedState(base, delta, 0.3)
    want = (base["w"].float().numpy() + np.float32(0.3) * delta["w"].numpy()).astype(np.float16)
    assert got["w"].dtype == torch.float16 and np.array_equal(got["w"].numpy(), want)
    assert torch.equal(got["n"], base["n"]) and list(got) == ["w", "n"]
    with pytest.raises(ValueError, match="lacks"):
        UpdatedState(base, {"x": delta["w"]}, 1.0)


def test_a_chunked_round_keeps_theta0_on_disk_until_closed(tmp_path):
    theta0 = {"backbone.w": torch.randn(3, 2), "head.weight": torch.randn(2, 2)}
    small = new_round(RoundSettings.build(), theta0)
    assert small.store is None and torch.equal(small.theta0["backbone.w"], theta0["backbone.w"])
    r = new_round(RoundSettings.build(chunk_bytes=1 << 20, spill_dir=str(tmp_path)), theta0)
    assert isinstance(r.theta0, MappedState)
    assert all(torch.equal(r.theta0[k], v) for k, v in theta0.items())
    folder = r.store.path
    assert folder.exists()
    r.close()
    assert not folder.exists()
