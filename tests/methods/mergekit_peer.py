"""The peer for tests/methods/test_mergekit_parity.py: small checkpoints on disk, mergekit's
own file merge (`mergekit-pytorch`, run in-process from a YAML config) and `fl-merge merge`
(fl_merge.io.file_merge.merge_files) on them, and a tensor-by-tensor comparison.

One `Case` per (fl-merge method + parameters) <-> (mergekit merge_method + parameters)
pair; a new method is one more entry in CASES (tests/methods/test_mergekit_parity.py).
The scale mapping is always the same: fl-merge's `--lambda L` is mergekit's `lambda: L`;
mergekit's per-model weight is K p_i for methods whose Delta stands where the mean stands
(lambda_scale "sum": mergekit then sums, normalize: false) and p_i for the "delta" ones
(mergekit's normalize: true divides by the weights, as our mean does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from fl_merge.io.file_merge import merge_files
from fl_merge.merging.scales import eta_for_lambda, lambda_scale

K = 4
# Per-model weights with dyadic p_i = w_i / 8, so that p_i and mergekit's weights scale
# exactly into each other; models 2 and 3 weigh the same (the exact sign ties below).
WEIGHTS = (1.0, 3.0, 2.0, 2.0)
# Distinct shapes (a DARE mask is told apart by its shape), numels multiple of 8 (dyadic
# fractions of them are integers: mergekit's density maps exactly onto our beta / gamma).
SHAPES = {
    "embed.weight": (48, 32),
    "mlp.weight": (24, 40),
    "opp.weight": (16, 24),   # updates of alternating sign: negative mean cosine (model_stock)
    "norm.weight": (40,),
    "mlp.bias": (24,),
}
TIES = 32  # embed.weight's first entries: tau_2 = -tau_3, tau_0 = tau_1 = 0 (sums exactly 0)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16"}


@dataclass(frozen=True)
class Case:
    """fl-merge `method` with `params` at `--lambda lam` against mergekit's `mk_method` with
    global parameters `mk_params` (plus `lambda: lam` where `mk_lambda`). `mk_weights`:
    whether mergekit takes per-model weights. `exact`: the files are bit-identical, else equal
    within `ulps` units in the last place of the output dtype. `peer_rng`: for a method
    that draws random masks, `peer_rng(models, params)` is a context manager within which
    mergekit draws fl-merge's masks (`dare_masks` for DARE). `mk_config`: more top-level
    keys of mergekit's YAML config. `num_models`: merge only the first n models (slerp: 2).
    `mk_base`: mergekit's base_model, "base" (the shared base), "first" (the first model, as
    slerp's t = 0 end, also listed among the models) or "none" (karcher takes no base)."""

    id: str
    method: str
    params: dict
    mk_method: str
    mk_params: dict = field(default_factory=dict)
    lam: float = 1.0
    mk_weights: bool = True
    mk_lambda: bool = True
    exact: bool = True
    ulps: int = 0
    peer_rng: Callable[[list[Path], dict], AbstractContextManager] | None = None
    weights: tuple | None = WEIGHTS  # None: uniform (mergekit's method takes no weights)
    mk_config: dict = field(default_factory=dict)
    num_models: int | None = None
    mk_base: str = "base"


def write_checkpoints(folder: Path, dtype: torch.dtype, seed: int = 0) -> tuple[Path, list[Path]]:
    """A base and K fine-tuned safetensors files of SHAPES in `dtype`: base ~ N(0, 1), each
    tau_i ~ 0.01 N(0, 1) plus a shared direction (positive cosines), opp.weight's tau_i of
    alternating sign, embed.weight's first TIES entries summing exactly to 0 over the
    clients under WEIGHTS, and a small negative drift on the rest of embed.weight (its
    elected signs are mostly negative, so a sign tie decides differently in the two tools'
    default conventions)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    shared = {k: 0.01 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = []
    for i in range(K):
        tau = {k: shared[k] + 0.01 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
        tau["opp.weight"] = (-1) ** i * 0.5 * shared["opp.weight"] + 0.01 * torch.randn(
            SHAPES["opp.weight"], generator=g)
        tau["embed.weight"] -= 0.004
        models.append(tau)
    flat = base["embed.weight"].view(-1)
    flat[:TIES] = 0.0
    v = 0.05 + 0.05 * torch.rand(TIES, generator=g)
    for i, tau in enumerate(models):
        tau["embed.weight"].view(-1)[:TIES] = (0.0, 0.0, 1.0, -1.0)[i] * v
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) for k, v in base.items()}, str(folder / "base.safetensors"))
    paths = []
    for i, tau in enumerate(models):
        paths.append(folder / f"model{i}.safetensors")
        save_file({k: (base[k] + tau[k]).to(dtype) for k in SHAPES}, str(paths[-1]))
    return folder / "base.safetensors", paths


def read(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or of the *.safetensors files of a folder."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@contextlib.contextmanager
def dare_masks(models: list[Path], params: dict):
    """Within the block, torch.bernoulli (mergekit's DARE masks) returns the mask fl-merge's
    dare draws for the same (model, tensor): the tensor is known by its shape, the model by
    the call's position among that tensor's calls (mergekit sparsifies a tensor's models in
    config order). The rest of mergekit's pipeline (rescaling, consensus, sums) runs as is."""
    from fl_merge.io.file_merge import model_names
    from fl_merge.methods.dare import keep_mask

    names = model_names(models)  # the names `fl-merge merge` keys the masks by
    drop_rate, seed = params["drop_rate"], params.get("seed", 0)
    by_shape = {tuple(s): k for k, s in SHAPES.items()}
    calls = {k: 0 for k in SHAPES}
    real = torch.bernoulli

    def bernoulli(probs, *args, **kwargs):
        key = by_shape[tuple(probs.shape)]
        i, calls[key] = calls[key], calls[key] + 1
        assert float(probs.reshape(-1)[0]) == 1.0 - drop_rate
        mask = keep_mask(seed, names[i], key, probs.numel(), 1.0 - drop_rate)
        return mask.reshape(probs.shape).to(probs.dtype)

    torch.bernoulli = bernoulli
    try:
        yield calls
    finally:
        torch.bernoulli = real
    assert calls == {k: len(models) for k in SHAPES}, calls


def run_mergekit(case: Case, base: Path, models: list[Path], dtype: torch.dtype, out: Path
                 ) -> dict[str, torch.Tensor]:
    """mergekit's raw-checkpoint merge (`mergekit-pytorch CONFIG OUT`, in-process) with
    `dtype: float32` (ours computes in float32) and the inputs' dtype out; with case.peer_rng
    active when the case has one."""
    from mergekit.scripts.merge_raw_pytorch import main

    models = models[:case.num_models]
    p = torch.tensor(case.weights or [1.0] * len(models), dtype=torch.float64)
    p = p / p.sum()
    scale = len(models) if lambda_scale(case.method, case.params) == "sum" else 1
    entries = [{"model": str(m)} for m in models]
    if case.mk_weights:
        for entry, pi in zip(entries, p.tolist()):
            entry["parameters"] = {"weight": scale * pi}
    params = dict(case.mk_params)
    if case.mk_lambda:
        params["lambda"] = case.lam
    cfg = {"merge_method": case.mk_method, "base_model": str(base), "models": entries,
           "parameters": params, "dtype": "float32", "out_dtype": DTYPE_NAMES[dtype], **case.mk_config}
    if case.mk_base == "first":
        cfg["base_model"] = str(models[0])
    elif case.mk_base == "none":
        del cfg["base_model"]
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    rng = contextlib.nullcontext() if case.peer_rng is None else case.peer_rng(models, case.params)
    with rng:
        main.main([str(path), str(out), "--device", "cpu", "--quiet"], standalone_mode=False)
    return read(out)


def run_ours(case: Case, base: Path, models: list[Path], out: Path) -> dict[str, torch.Tensor]:
    """`fl-merge merge --lambda lam` through its engine, fl_merge.io.file_merge.merge_files."""
    models = models[:case.num_models]
    eta = eta_for_lambda(case.method, case.lam, len(models), case.params)
    weights = None if case.weights is None else list(case.weights)
    merge_files(base, models, case.method, eta, out, case.params, weights=weights)
    return read(out)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at |x| (float64 result)."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def max_abs_diff(ours: dict, theirs: dict) -> dict[str, float]:
    return {k: float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours}


def assert_parity(case: Case, ours: dict, theirs: dict, inputs: list[dict]) -> None:
    """Bit-identical outputs (case.exact), else |ours - theirs| <= case.ulps units in the
    last place of the output dtype at the entry's scale: the largest |value| among the
    base, the models and both outputs there (the size of the sums both tools round)."""
    assert set(ours) == set(theirs)
    for key, a in ours.items():
        b = theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if case.exact:
            bad = int((a != b).sum())
            assert bad == 0, f"{case.id}: {key} differs in {bad} of {a.numel()} entries"
        else:
            scale = torch.stack([t[key].to(a.dtype).abs() for t in (*inputs, ours, theirs)]).amax(0)
            tol = case.ulps * ulp(scale)
            bad = int(((a.double() - b.double()).abs() > tol).sum())
            assert bad == 0, f"{case.id}: {key} differs by more than {case.ulps} ulp in {bad} entries"
