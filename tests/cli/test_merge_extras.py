"""`fl-merge merge --extras NAME=F1,...,FK`: the per-model arrays a method needs (regmean's
Gram matrices, fisher's diagonal Fisher) from one safetensors file per model. The file merge
must equal fl_merge.merge on the whole task vectors with the same arrays (both methods are
exact per tensor); what is missing or misshapen is one error line before anything is written."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from fl_merge.cli.merge import main
from fl_merge.methods import merge

SHAPES = {"enc.weight": (6, 5), "enc.bias": (6,), "head.weight": (3, 6), "scalar": ()}
K = 3


@pytest.fixture
def pool(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    models = [{n: v + 0.5 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(K)]
    grams, fishers = [], []
    for i, m in enumerate(models):
        x_enc, x_head = torch.randn(20, 5, generator=g), torch.randn(9, 6, generator=g)
        grams.append({"enc.weight": x_enc.T @ x_enc / 20, "head.weight": x_head.T @ x_head / 9})
        fishers.append({n: torch.rand(s, generator=g) for n, s in SHAPES.items()})
        save_file(m, str(tmp_path / f"m{i}.safetensors"))
        save_file(grams[-1], str(tmp_path / f"g{i}.safetensors"))
        save_file(fishers[-1], str(tmp_path / f"f{i}.safetensors"))
    save_file(base, str(tmp_path / "base.safetensors"))
    taus = [{n: m[n] - base[n] for n in base} for m in models]
    return tmp_path, base, taus, grams, fishers


def run(tmp, method, extras, *more):
    args = ["--base", str(tmp / "base.safetensors"), "--models",
            *[str(tmp / f"m{i}.safetensors") for i in range(K)], "--method", method, "--eta", "1",
            "--out", str(tmp / "out.safetensors"), *more]
    return main(args + (["--extras", *extras] if extras else []))


def files(tmp, prefix):
    return ",".join(str(tmp / f"{prefix}{i}.safetensors") for i in range(K))


@pytest.mark.parametrize("method,prefix", [("regmean", "g"), ("fisher", "f")])
def test_a_file_merge_with_extras_is_the_method(pool, method, prefix):
    tmp, base, taus, grams, fishers = pool
    stats = grams if method == "regmean" else fishers
    assert run(tmp, method, [f"{'gram' if method == 'regmean' else 'fisher'}={files(tmp, prefix)}"]) == 0
    want = merge(method, taus, extras={"gram" if method == "regmean" else "fisher": stats})
    got = load_file(str(tmp / "out.safetensors"))
    for n in base:
        torch.testing.assert_close(got[n], base[n] + want[n], rtol=1e-5, atol=1e-6)


def test_the_yaml_config_takes_extras(pool):
    tmp, base, taus, grams, _ = pool
    cfg = tmp / "merge.yaml"
    models = "\n".join(f"  - {tmp / f'm{i}.safetensors'}" for i in range(K))
    gram = "\n".join(f"    - {tmp / f'g{i}.safetensors'}" for i in range(K))
    cfg.write_text(f"base: {tmp / 'base.safetensors'}\nmodels:\n{models}\nmethod: regmean\neta: 1\n"
                   f"out: {tmp / 'out.safetensors'}\nparams: {{alpha: 0.5}}\nextras:\n  gram:\n{gram}\n")
    assert main([str(cfg)]) == 0
    want = merge("regmean", taus, extras={"gram": grams}, alpha=0.5)
    got = load_file(str(tmp / "out.safetensors"))
    torch.testing.assert_close(got["enc.weight"], base["enc.weight"] + want["enc.weight"], rtol=1e-5, atol=1e-6)


def test_bad_extras_are_one_line_before_anything_is_written(pool, capsys, tmp_path):
    tmp, *_ = pool
    save_file({"enc.bias": torch.eye(6)}, str(tmp / "bias.safetensors"))
    save_file({"enc.weight": torch.eye(6)}, str(tmp / "wrong.safetensors"))
    save_file({"enc.weight": torch.ones(5, 5) * 2 - torch.eye(5)}, str(tmp / "notgram.safetensors"))
    two = ",".join(str(tmp / f"g{i}.safetensors") for i in range(2))
    cases = [
        ([], r"needs per-model gram arrays, which checkpoints do not carry: give one safetensors "
             r"file per model, --extras gram=F1,...,FK"),
        ([f"gram={two}"], r"--extras gram: 2 file\(s\) for 3 models"),
        ([f"gram={two},{tmp / 'bias.safetensors'}"], r"covers other tensors than"),
        ([f"fisher={files(tmp, 'f')}", f"gram={files(tmp, 'g')}"], r"uses no per-model fisher arrays"),
        (["gram"], r"--extras wants name=F1,...,FK"),
    ]
    for extras, match in cases:
        assert run(tmp, "regmean", extras) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(match, err), err
        assert not (tmp / "out.safetensors").exists()
    for name, match in (("bias", r"tensor 'enc.bias' is \[6\] in the base, not a 2-D weight"),
                        ("wrong", r"tensor 'enc.weight' has shape \[6, 6\], the base's \[6, 5\] needs \[5, 5\]"),
                        ("notgram", r"is not a Gram matrix")):
        same = ",".join([str(tmp / f"{name}.safetensors")] * K)
        assert run(tmp, "regmean", [f"gram={same}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(match, err), err
        assert not (tmp / "out.safetensors").exists()
