"""fl-merge against mergekit, the peer tool (issue 26, item 8): the same small checkpoints
(tests/methods/mergekit_peer.py: fp32 and fp16, matrices of several shapes, 1-D tensors,
exact sign ties) merged by `mergekit-pytorch` (mergekit 0.1.5, its YAML config, in-process
on the CPU) and by `fl-merge merge`, compared tensor by tensor.

Each CASES entry pairs an fl-merge method with mergekit's; with convention=mergekit the
files are bit-identical (or within rounding where the two compute the same sum in another
order: `ulps`). DARE draws random masks: mergekit's come from torch's global generator,
ours from a generator keyed by (seed, model, tensor), so the masks cannot be the same
draws; the DARE cases feed fl-merge's masks to mergekit's torch.bernoulli (the rest of its
pipeline runs unchanged) and test_dare_masks_match_in_distribution checks the real draws
of both tools against the Bernoulli law. The default (fl-merge) conventions differ where
docs/methods.md says: the last tests pin those differences down.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mergekit.scripts.merge_raw_pytorch",
                    reason="mergekit is not installed (it comes with the dev extra: pip install -e '.[dev]')")

from fl_merge.methods import merge
from methods.mergekit_peer import (
    SHAPES,
    TIES,
    WEIGHTS,
    Case,
    assert_parity,
    dare_masks,
    max_abs_diff,
    read,
    run_mergekit,
    run_ours,
    write_checkpoints,
)

MK = {"convention": "mergekit"}
# One entry per method pair. A new one (della, sce, slerp, karcher, ...): its fl-merge name
# and parameters, mergekit's merge_method and global parameters, the --lambda both take
# (mk_lambda=False where mergekit has none), mk_weights / weights for its per-model weights,
# exact or the ulps it may differ by, a peer_rng context for random masks (see dare_masks),
# and mk_config for other top-level keys of mergekit's YAML.
CASES = [
    # Task Arithmetic: ours streams theta0 + sum_i eta p_i tau_i, mergekit theta0 + lambda *
    # sum_i w_i tau_i: the same sum in another order
    Case("task_arithmetic", "task_arithmetic", {}, "task_arithmetic", lam=0.3, exact=False, ulps=2),
    Case("ties", "ties", {"density": 0.3, **MK}, "ties", {"density": 0.3}, lam=0.5),
    Case("ties-density-1", "ties", {"density": 1.0, **MK}, "ties", {"density": 1.0}, lam=1.0),
    Case("dare_ties", "dare", {"drop_rate": 0.5, "base": "ties", "density": 1.0, **MK},
         "dare_ties", {"density": 0.5, "normalize": True}, lam=0.5, peer_rng=dare_masks),
    # dare_linear: ours accumulates p_i hat tau_i, mergekit sums w_i hat tau_i
    Case("dare_linear", "dare", {"drop_rate": 0.5, **MK}, "dare_linear", {"density": 0.5},
         lam=0.3, peer_rng=dare_masks, exact=False, ulps=2),
    Case("dare-no-drop", "dare", {"drop_rate": 0.0}, "dare_linear", {"density": 1.0}, lam=0.3,
         exact=False, ulps=2),
    # mergekit's density 0.25 and gamma 0.125 (top fraction) are our beta 0.125, gamma 0.625
    Case("breadcrumbs", "breadcrumbs", {"beta": 0.125, "gamma": 0.625, **MK}, "breadcrumbs",
         {"density": 0.25, "gamma": 0.125}, lam=0.25),
    # mergekit writes t mean theta_i + (1 - t) theta0, we theta0 + t mean tau_i
    Case("model_stock", "model_stock", MK, "model_stock", mk_weights=False, mk_lambda=False,
         weights=None, exact=False, ulps=2),
    # DELLA at density 1 and epsilon 0 keeps every entry (its masks are random below that,
    # and drawn from other generators, as DARE's): the rescale, the sign election and the
    # agreeing mean; della normalises (eta = lambda), della_linear sums (eta = K lambda)
    Case("della", "della", {"density": 1.0, "epsilon": 0.0}, "della",
         {"density": 1.0, "epsilon": 0.0}, lam=0.5, exact=False, ulps=2),
    Case("della_linear", "della", {"density": 1.0, "epsilon": 0.0, "linear": True},
         "della_linear", {"density": 1.0, "epsilon": 0.0}, lam=0.3, exact=False, ulps=2),
    # SCE takes no weights and no lambda: mergekit's model is eta = 1
    Case("sce", "sce", {"select_topk": 0.5}, "sce", {"select_topk": 0.5}, mk_weights=False,
         mk_lambda=False, weights=None, exact=False, ulps=2),
    # slerp of the first two models; mergekit's t = 0 end is its base_model (our first client)
    Case("slerp", "slerp", {"t": 0.3}, "slerp", {"t": 0.3}, mk_weights=False, mk_lambda=False,
         weights=None, exact=False, ulps=2, num_models=2, mk_base="first"),
    # karcher: the spherical mean of the K models, no base model; its 10 iterations run in
    # float64 here and float32 in mergekit: up to 4 ulp apart (3-4 on 8 entries of 1344)
    Case("karcher", "karcher", {"max_iter": 10, "tol": 1e-5}, "karcher",
         {"max_iter": 10, "tol": 1e-5}, mk_weights=False, mk_lambda=False, weights=None,
         exact=False, ulps=4, mk_base="none"),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit-parity")
    return {name: write_checkpoints(root / name, dtype) for name, dtype in DTYPES.items()}


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parity(case, dtype_name, checkpoints, tmp_path):
    base, models = checkpoints[dtype_name]
    ours = run_ours(case, base, models, tmp_path / "ours.safetensors")
    theirs = run_mergekit(case, base, models, DTYPES[dtype_name], tmp_path / "mergekit")
    MEASURED[f"{case.id}/{dtype_name}"] = max(max_abs_diff(ours, theirs).values())
    inputs = [read(p) for p in (base, *models)]
    assert_parity(case, ours, theirs, inputs)
    assert any(not torch.equal(ours[k], inputs[0][k]) for k in SHAPES)  # something was merged


def test_dare_masks_match_in_distribution(checkpoints, tmp_path):
    """The real draws: one model, drop rate 1/2, mergekit's global generator and ours. Each
    tool keeps each entry with probability 1/2 (within 5 sigma per tensor) and rescales a
    tensor to its l1 norm (convention=mergekit)."""
    base, models = checkpoints["fp32"]
    case = Case("dare", "dare", {"drop_rate": 0.5, **MK}, "dare_linear", {"density": 0.5}, lam=1.0,
                weights=None)
    torch.manual_seed(0)
    outs = {"mergekit": run_mergekit(case, base, models[:1], torch.float32, tmp_path / "mk"),
            "ours": run_ours(case, base, models[:1], tmp_path / "ours.safetensors")}
    theta0, theta1 = read(base), read(models[0])
    for tool, out in outs.items():
        for key in SHAPES:
            tau, hat = theta1[key] - theta0[key], out[key] - theta0[key]
            n = tau.numel()
            kept = int((hat != 0).sum())
            assert abs(kept - n / 2) <= 5 * (n / 4) ** 0.5, (tool, key, kept, n)
            assert float(hat.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-4), (tool, key)
    assert not torch.equal(outs["mergekit"]["embed.weight"], outs["ours"]["embed.weight"])


def _default_ties(base, models, groups, dtype):
    """theta0 + 1.0 * fl_merge.merge('ties', density 0.3, WEIGHTS) on the files' task
    vectors (float32), run on each group of tensor names alone, in `dtype`."""
    theta0, thetas = read(base), [read(m) for m in models]
    out = {}
    for keys in groups:
        taus = [{k: t[k].float() - theta0[k].float() for k in keys} for t in thetas]
        delta = merge("ties", taus, list(WEIGHTS), density=0.3)
        out.update({k: (theta0[k].float() + delta[k]).to(dtype) for k in keys})
    return out


def test_ties_default_differs_at_exact_sign_ties(checkpoints, tmp_path):
    """fp32 (no ties at the top-k threshold): `fl-merge merge`'s default TIES is the whole
    update's (its top-k over the whole task vector; fl_merge/io/file_passes.py), so it differs
    from mergekit's per-tensor TIES by scope. Run per tensor, fl-merge's TIES and mergekit's
    differ exactly at the coordinates whose weighted vote is exactly 0 (embed.weight's first
    TIES entries): there mergekit elects + and keeps model 2's entry, we take the majority
    sign, negative here, and keep model 3's."""
    base, models = checkpoints["fp32"]
    case = Case("ties", "ties", {"density": 0.3}, "ties", {"density": 0.3}, lam=1.0)
    ours = run_ours(case, base, models, tmp_path / "ours.safetensors")
    theirs = run_mergekit(case, base, models, torch.float32, tmp_path / "mk")
    whole = _default_ties(base, models, [list(SHAPES)], torch.float32)
    assert all(torch.equal(ours[k], whole[k]) for k in SHAPES)
    assert sum(int((ours[k] != theirs[k]).sum()) for k in SHAPES) > TIES  # the scope
    per_tensor = _default_ties(base, models, [[k] for k in SHAPES], torch.float32)
    for key in SHAPES:
        differ = (per_tensor[key] != theirs[key]).reshape(-1).nonzero().reshape(-1).tolist()
        assert differ == (list(range(TIES)) if key == "embed.weight" else []), key
    theta2, theta3 = (read(p)["embed.weight"].reshape(-1)[:TIES] for p in (models[2], models[3]))
    assert torch.equal(theirs["embed.weight"].reshape(-1)[:TIES], theta2)
    assert torch.equal(per_tensor["embed.weight"].reshape(-1)[:TIES], theta3)


def test_ties_default_differs_on_fp16_threshold_ties(checkpoints, tmp_path):
    """fp16 task vectors repeat values: entries tied with the k-th largest |tau_i| are all
    kept by fl-merge (the TIES authors' >= threshold), exactly k by mergekit (compared per
    tensor, mergekit's scope; `fl-merge merge` itself ranks the whole update)."""
    base, models = checkpoints["fp16"]
    case = Case("ties", "ties", {"density": 0.3}, "ties", {"density": 0.3}, lam=1.0)
    ours = run_ours(case, base, models, tmp_path / "ours.safetensors")
    theirs = run_mergekit(case, base, models, torch.float16, tmp_path / "mk")
    whole = _default_ties(base, models, [list(SHAPES)], torch.float16)
    assert all(torch.equal(ours[k], whole[k]) for k in SHAPES)
    per_tensor = _default_ties(base, models, [[k] for k in SHAPES], torch.float16)
    differ = sum(int((per_tensor[k] != theirs[k]).sum()) for k in SHAPES)
    total = sum(ours[k].numel() for k in SHAPES)
    MEASURED["ties-default/fp16 entries differing"] = differ / total
    MEASURED["ties-default/fp16 entries differing, fl-merge merge (whole update)"] = sum(
        int((ours[k] != theirs[k]).sum()) for k in SHAPES) / total
    assert TIES < differ < 0.05 * total


def test_model_stock_default_differs_on_opposed_updates(checkpoints, tmp_path):
    """fl-merge clamps Model Stock's mean cosine to [0, 1]: opp.weight, whose updates point
    apart (negative mean cosine), stays at theta0; mergekit's negative t steps away from
    the average. Every other tensor agrees within rounding."""
    base, models = checkpoints["fp32"]
    case = Case("model_stock", "model_stock", {}, "model_stock", mk_weights=False, mk_lambda=False,
                weights=None, exact=False, ulps=2)
    ours = run_ours(case, base, models, tmp_path / "ours.safetensors")
    theirs = run_mergekit(case, base, models, torch.float32, tmp_path / "mk")
    theta0 = read(base)
    assert torch.equal(ours["opp.weight"], theta0["opp.weight"])
    assert float((theirs["opp.weight"] - theta0["opp.weight"]).abs().max()) > 1e-4
    rest = [k for k in SHAPES if k != "opp.weight"]
    assert_parity(case, {k: ours[k] for k in rest}, {k: theirs[k] for k in rest},
                  [read(p) for p in (base, *models)])


def test_report_measured_differences():
    """Prints the max |fl-merge - mergekit| per case and dtype (run with -s to see it)."""
    for name, value in sorted(MEASURED.items()):
        print(f"mergekit parity: {name}: {value:.3g}")


@pytest.mark.parametrize("case", [c for c in CASES if c.mk_method in ("ties", "dare_ties")], ids=lambda c: c.id)
def test_parity_holds_when_the_consensus_runs_in_blocks(case, checkpoints, tmp_path, monkeypatch):
    """conventions.disjoint_mean runs on blocks of BLOCK coordinates (the files' tensors are
    a few of its blocks at 1 << 18); with blocks of 256 every tensor here spans several
    blocks and a remainder, and the files stay equal to mergekit's whole-tensor ones."""
    from fl_merge.merging import conventions

    monkeypatch.setattr(conventions, "BLOCK", 256)
    assert max(len(conventions.column_blocks(n, 256)) for n in (40, 960, 1536)) == 6
    base, models = checkpoints["fp16"]
    ours = run_ours(case, base, models, tmp_path / "ours.safetensors")
    theirs = run_mergekit(case, base, models, torch.float16, tmp_path / "mergekit")
    assert_parity(case, ours, theirs, [read(p) for p in (base, *models)])
