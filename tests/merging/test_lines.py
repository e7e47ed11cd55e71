"""LiNeS (Wang et al., ICLR 2025) as a modifier of any method: the per-layer scale
alpha + beta (l - 1) / (L - 1) written out by hand, the layer index read from real-looking
parameter names, the authors' auto alpha, the search grid, `fl-merge merge --lines`, and
one-line refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fl_merge.cli.merge import main
from fl_merge.core.task_vectors import MergeInputError
from fl_merge.merging.lines import DEFAULT_PATTERN, depths, lines_merge, lines_settings
from fl_merge.merging.scales import eta_for_lambda
from fl_merge.methods import merge

ROOT_TMP = __import__("pathlib").Path("/tmp")

# (name, layer by hand) for the naming schemes the default pattern reads; None: no layer
NAMES = [
    ("backbone.embeddings.word_embeddings.weight", None),        # Hugging Face BERT
    ("backbone.encoder.layer.0.attention.self.query.weight", 1),
    ("backbone.encoder.layer.1.output.dense.bias", 2),
    ("backbone.encoder.layer.11.output.LayerNorm.weight", 12),
    ("backbone.pooler.dense.weight", None),
]
OTHER_SCHEMES = {
    "llama": (["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.31.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"],
              [None, 1, 2, None, None]),
    "timm": (["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
              "blocks.5.mlp.fc2.bias", "blocks.11.norm1.weight", "norm.weight", "head.weight"],
             [None, None, None, 1, 2, 3, None, None]),
    "gpt2": (["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
              "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight"], [None, 1, 2, None]),
    "open_clip": (["visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
                   "visual.transformer.resblocks.2.mlp.c_proj.weight", "visual.ln_post.weight",
                   "visual.proj"], [None, 1, 2, None, None]),
    "t5": (["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
            "encoder.block.1.layer.1.DenseReluDense.wi.weight"], [None, 1, 2]),
}


def test_depths_from_real_looking_names():
    got = depths([n for n, _ in NAMES])
    # indices 0, 1, 11 are three layers (ranked): 11 is not read as 1, 1 is not found in 11
    assert got == {n: {None: None, 1: 1, 2: 2, 12: 3}[d] for n, d in NAMES}
    for scheme, (names, expected) in OTHER_SCHEMES.items():
        assert list(depths(names).values()) == expected, scheme
    # torchvision ResNet's stages (layer1.0.conv1) are not blocks of the default pattern
    with pytest.raises(MergeInputError, match="matches no parameter name"):
        depths(["layer1.0.conv1.weight", "layer2.0.conv1.weight", "fc.weight"])
    # ...a pattern of one's own reads them
    assert list(depths(["layer1.0.conv1.weight", "layer4.1.conv2.weight", "fc.weight"],
                       r"^layer(\d+)\.").values()) == [1, 2, None]


def _tvs(names, k=3, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {n: (3, 2) if i % 2 else (4,) for i, n in enumerate(names)}
    return [{n: torch.tensor(rng.normal(size=s)) for n, s in shapes.items()} for _ in range(k)]


BLOCKS = ["embed.weight", "blocks.0.w", "blocks.1.w", "blocks.2.b", "blocks.3.w", "head.w"]


@pytest.mark.parametrize("w", [None, [1.0, 2.0, 5.0]])
def test_task_arithmetic_per_layer_scale_by_hand(w):
    tvs = _tvs(BLOCKS)
    alpha, beta = 0.3, 0.6
    by_hand = {"embed.weight": 0.3, "blocks.0.w": 0.3, "blocks.1.w": 0.5, "blocks.2.b": 0.7,
               "blocks.3.w": 0.9, "head.w": 0.3}  # alpha + beta (l - 1) / 3; no index: alpha
    p = np.full(3, 1 / 3) if w is None else np.array(w) / sum(w)
    out = lines_merge("fedavg", tvs, w, lines={"alpha": alpha, "beta": beta})
    eta = eta_for_lambda("fedavg", 1.0, 3)  # LiNeS replaces lambda: applied at lambda = 1
    for n, s in by_hand.items():
        tau_mtl = 3 * sum(pi * tv[n].numpy() for pi, tv in zip(p, tvs))  # TA's sum (weighted)
        np.testing.assert_allclose(eta * out[n].numpy(), s * tau_mtl, rtol=1e-12)


@pytest.mark.parametrize("method,kw", [("fedavg", {}), ("ties", {"density": 0.5}),
                                       ("wudi", {"iters": 5})])
def test_beta_zero_is_the_method_at_lambda_alpha(method, kw):
    tvs = _tvs(BLOCKS, seed=1)
    out = lines_merge(method, tvs, lines={"alpha": 0.7, "beta": 0.0}, **kw)
    delta = merge(method, tvs, **kw)
    for n in BLOCKS:  # theta0 + eta(1) * out == theta0 + eta(0.7) * Delta
        np.testing.assert_allclose(eta_for_lambda(method, 1.0, 3, kw) * out[n].numpy(),
                                   eta_for_lambda(method, 0.7, 3, kw) * delta[n].numpy(), rtol=1e-12)


def test_auto_alpha_is_the_authors_l1_ratio():
    tvs = _tvs(BLOCKS, seed=2)
    mean = {n: np.mean([tv[n].numpy() for tv in tvs], 0) for n in BLOCKS}
    # Task Arithmetic: tau_MTL = sum tau_i, alpha = 1/K: the first layer is the plain average
    out = lines_merge("fedavg", tvs, lines={"beta": 0.5})
    np.testing.assert_allclose(3 * out["blocks.0.w"].numpy(), mean["blocks.0.w"], rtol=1e-12)
    np.testing.assert_allclose(3 * out["blocks.3.w"].numpy(), (1 / 3 + 0.5) * 3 * mean["blocks.3.w"],
                               rtol=1e-12)
    # TIES (lambda = eta): alpha = ||sum tau_i||_1 / (K ||tau_ties||_1)
    ties = merge("ties", tvs, density=0.5)
    l1 = sum(np.abs(ties[n].numpy()).sum() for n in BLOCKS)
    alpha = sum(np.abs(3 * mean[n]).sum() for n in BLOCKS) / (3 * l1)
    out = lines_merge("ties", tvs, lines={"alpha": "auto", "beta": 0.2}, density=0.5)
    np.testing.assert_allclose(out["blocks.2.b"].numpy(), (alpha + 0.2 * 2 / 3) * ties["blocks.2.b"].numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(out["head.w"].numpy(), alpha * ties["head.w"].numpy(), rtol=1e-12)


def test_search_grid_is_the_papers():
    grid = lines_settings()
    assert [s["beta"] for s in grid] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert {s["alpha"] for s in grid} == {"auto"} and {s["pattern"] for s in grid} == {DEFAULT_PATTERN}
    assert lines_settings({"beta": 0.4}) == [{"alpha": "auto", "beta": 0.4, "pattern": DEFAULT_PATTERN}]
    assert [(s["alpha"], s["beta"]) for s in lines_settings({"alpha": [0.1, 0.2], "beta": [1.0]})] == \
        [(0.1, 1.0), (0.2, 1.0)]
    with pytest.raises(MergeInputError, match="beta .* >= 0"):
        lines_settings({"beta": [0.5, -1.0]})
    with pytest.raises(MergeInputError, match="grid of beta is empty"):
        lines_settings({"beta": []})


@pytest.mark.parametrize("lines,match", [
    ({"pattern": r"^stage(\d+)\."}, "matches no parameter name"),
    ({"pattern": r"^(embed)\."}, "captures 'embed' in 'embed.weight', not a layer index"),
    ({"pattern": r"^blocks\.(0)\."}, r"one layer only .*\(L >= 2\)"),
    ({"alpha": -0.1}, "alpha .* number >= 0"),
    ({"beta": -0.5}, "beta .* number >= 0"),
    ({"beta": "big"}, "beta .* number >= 0"),
    ({"pattern": "blocks.(\\d+"}, "not a valid regex"),
    ({"pattern": r"blocks\.\d+\."}, "needs a group capturing the layer index"),
    ({"gamma": 1.0}, r"unknown key\(s\) \['gamma'\]"),
])
def test_bad_lines_are_one_line_errors_before_merging(lines, match, monkeypatch):
    import fl_merge.merging.lines as mod

    monkeypatch.setattr(mod, "merge", lambda *a, **k: pytest.fail("merged before checking"))
    with pytest.raises(MergeInputError, match=match) as e:
        lines_merge("fedavg", _tvs(BLOCKS), lines=lines)
    assert "\n" not in str(e.value)


def _write(tmp, names, k=3):
    rng = np.random.default_rng(5)
    sd = lambda: {n: torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float32) for n in names}
    base, models = sd(), [sd() for _ in range(k)]
    save_file(base, str(tmp / "base.safetensors"))
    paths = []
    for i, m in enumerate(models):
        save_file(m, str(tmp / f"m{i}.safetensors"))
        paths.append(str(tmp / f"m{i}.safetensors"))
    return base, models, str(tmp / "base.safetensors"), paths


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])  # the linear path and merge_tensor's
def test_file_merge_lines_is_the_per_layer_lambda(tmp_path, capsys, method):
    names = ["embeddings.weight", "encoder.layer.0.w", "encoder.layer.1.w", "encoder.layer.2.w"]
    base, models, b, ms = _write(tmp_path, names)
    out = tmp_path / "out.safetensors"
    assert main(["--base", b, "--models", *ms, "--method", method, "--lines", "alpha=0.2", "beta=0.8",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    got = load_file(str(out))
    whole = merge(method, [{n: m[n] - base[n] for n in names} for m in models])  # ties: exact
    for n, lam in zip(names, (0.2, 0.2, 0.6, 1.0)):  # alpha + beta (l - 1) / 2, alpha outside blocks
        delta = whole[n]
        torch.testing.assert_close(got[n], base[n] + eta_for_lambda(method, lam, 3) * delta)


@pytest.mark.parametrize("args,match", [
    (["--lines", "alpha=0.2", "beta=0.5", "--lambda", "0.3"], "--lines replaces --lambda/--eta"),
    (["--lines", "alpha=auto", "beta=0.5"], "alpha=auto needs the whole merged vector"),
    (["--lines", "alpha=0.2", "beta=-1"], "beta .* >= 0"),
    (["--lines", "alpha=0.2", "beta=0.5", "pattern=^x(\\d+)"], "matches no parameter name"),
])
def test_file_merge_refusals_are_one_line_and_write_nothing(tmp_path, capsys, args, match):
    _, _, b, ms = _write(tmp_path, ["blocks.0.w", "blocks.1.w"])
    out = tmp_path / "out.safetensors"
    assert main(["--base", b, "--models", *ms, "--method", "fedavg", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert not out.exists()


# ---------------------------------------------------------------- the round's candidates

def test_round_candidates_cross_each_setting_with_the_lines_grid():
    from fl_merge.round.candidates import candidate_lines, plan_candidates

    tvs = _tvs(BLOCKS)
    methods = {"fedavg": ("fedavg", {}), "ties": ("ties", {"density": 0.2})}
    spaces = {"ties": {"density": (0.1, 0.2)}}
    cands = plan_candidates(methods, spaces, "paper", [0.5, 1.0], [], tvs, {"beta": [0.2, 0.6]})
    assert list(cands) == [
        "fedavg[lines.alpha=auto,lines.beta=0.2]", "fedavg[lines.alpha=auto,lines.beta=0.6]",
        "ties[density=0.1,lines.alpha=auto,lines.beta=0.2]", "ties[density=0.1,lines.alpha=auto,lines.beta=0.6]",
        "ties[density=0.2,lines.alpha=auto,lines.beta=0.2]", "ties[density=0.2,lines.alpha=auto,lines.beta=0.6]"]
    for c in cands.values():  # LiNeS replaces lambda: the one eta of lambda 1 (0 is the base)
        assert c.etas == [0.0, eta_for_lambda(c.name, 1.0, 3)] and c.lines["pattern"] == DEFAULT_PATTERN
    assert set(candidate_lines(cands)) == set(cands)
    # search=off: the one setting given (defaults for the rest); no LiNeS: lambda grid as before
    off = plan_candidates(methods, spaces, "off", None, [0.5, 1.0], tvs, {"alpha": 0.1, "beta": 0.3})
    assert [(c.lines["alpha"], c.lines["beta"]) for c in off.values()] == [(0.1, 0.3), (0.1, 0.3)]
    plain = plan_candidates(methods, spaces, "paper", [0.5, 1.0], [], tvs)
    assert candidate_lines(plain) == {} and plain["fedavg"].etas == [0.0, 1.5, 3.0]


def test_round_merge_scales_each_candidate_and_merges_each_setting_once(monkeypatch):
    import fl_merge.round.merging as rm
    from fl_merge.round.candidates import candidate_lines, candidate_methods, plan_candidates
    from fl_merge.round.updates import ClientUpdate

    tvs = _tvs(BLOCKS, seed=3)
    clients = [ClientUpdate(i, {"num-examples": 1 + i, "partition-id": i}, {}) for i in range(3)]
    cands = plan_candidates({"ties": ("ties", {"density": 0.5})}, {}, "paper", None, [1.0], tvs,
                            {"alpha": 0.1, "beta": [0.0, 0.9]})
    calls = []
    real = rm.merge
    monkeypatch.setattr(rm, "merge", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    deltas = rm.merge_methods(candidate_methods(cands), clients, tvs, "num-examples", "cpu",
                              candidate_lines(cands))
    assert calls == ["ties"]  # one merge, two LiNeS settings
    ties = merge("ties", tvs, [1, 2, 3], names=[c.identity for c in clients], density=0.5)
    for label, beta in zip(cands, (0.0, 0.9)):
        for n, lam in zip(BLOCKS, (0.1, 0.1, 0.1 + beta / 3, 0.1 + 2 * beta / 3, 0.1 + beta, 0.1)):
            np.testing.assert_allclose(deltas[label][n].numpy(), lam * ties[n].numpy(), rtol=1e-12)


def test_round_settings_check_lines_up_front():
    from fl_merge.round.settings import RoundSettings

    st = RoundSettings.build(method="fedavg", search="paper", lines={"beta": [0.1, 0.2]})
    assert st.lines == {"beta": [0.1, 0.2]} and RoundSettings.build().lines is None
    with pytest.raises(ValueError, match="beta .* >= 0"):
        RoundSettings.build(search="paper", lines={"beta": [0.1, -0.2]})
    with pytest.raises(ValueError, match="several values for beta .* needs search=paper"):
        RoundSettings.build(search="off", lines={"beta": [0.1, 0.2]})


def test_run_config_lines_parse_check_and_reach_the_round():
    from fl_merge.config.run_config import ConfigError, RunConfig
    from fl_merge.round.candidates import parse_lines

    assert parse_lines("", "paper") is None and parse_lines("off", "off") is None
    assert parse_lines("paper", "paper") == {}  # the paper's: auto alpha, its beta grid
    assert parse_lines(r"alpha=0.1 beta=0.2|0.4,0.6 pattern=(?:blocks|layers)\.(\d+)\.", "paper") == \
        {"alpha": 0.1, "beta": [0.2, 0.4, 0.6], "pattern": r"(?:blocks|layers)\.(\d+)\."}
    for text, search, match in [("beta=0.1|0.2", "off", "several values for beta .* search=paper"),
                                ("beta", "paper", "'beta' is not name=value"),
                                ("beta=-1", "paper", "beta .* >= 0"),
                                ("pattern=blocks", "paper", "needs a group capturing")]:
        with pytest.raises(ValueError, match=match):
            parse_lines(text, search)
    with pytest.raises(ConfigError, match="lines beta"):
        RunConfig.from_flower({"lines": "beta=-2"}).resolve()
    cfg = RunConfig.from_flower({"lines": "alpha=auto beta=0.3|0.7"}).resolve()
    st = cfg.round_settings(ROOT_TMP)
    assert st.lines == {"alpha": "auto", "beta": [0.3, 0.7]}
    assert RunConfig.from_flower({}).resolve().round_settings(ROOT_TMP).lines is None


def test_hydra_mapping_gives_the_run_config_string():
    from fl_merge.cli.mapping import to_flower

    flower, _ = to_flower({"lines": {"alpha": 0.2, "beta": [0.1, 0.5]}})
    assert flower["lines"] == "alpha=0.2 beta=0.1,0.5"
