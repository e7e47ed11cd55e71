"""Models from a user's own sources (issue 15 item 4): an hf: image backbone (a tiny ViT the
test saves), hf: hub ids (offline: one clear error), and BatchNorm folding of timm's
norm-act layers (a stand-in of timm's BatchNormAct2d, which needs torchvision)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.models.image_layers import ChannelAffineAct, fold_batchnorm
from fl_merge.models.registry import build_model, get_model_spec, pretrained_backbone
from fl_merge.round.keys import DEFAULT_MERGE_KEYS, check_merge_keys, key_matcher

transformers = pytest.importorskip("transformers")

VIT = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=2,
           num_attention_heads=2, intermediate_size=48)


def _save_vit(folder, mean=None, std=None):
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**VIT))
    model.save_pretrained(folder)
    if mean is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    return model


def test_an_hf_vit_folder_is_an_image_backbone_that_trains_and_is_merged(tmp_path):
    from fl_merge.models.training import fit

    folder = tmp_path / "vit"
    saved = _save_vit(folder, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]).state_dict()
    name = f"hf:{folder}"
    spec = get_model_spec(name)
    assert (spec.input_kind, spec.feature_dim) == ("image", VIT["hidden_size"])
    # theta0 is the weights of the model the test saved, under backbone.net.
    theta0 = pretrained_backbone(name)
    assert {k.removeprefix("backbone.net.") for k in theta0} == set(saved)
    assert all(torch.equal(theta0[f"backbone.net.{k}"], v) for k, v in saved.items())
    # every backbone parameter is merged by the default merge-keys, the head is not
    model = build_model(name, num_classes=2)
    model.load_state_dict(theta0, strict=False)
    keys = list(model.state_dict())
    merged = check_merge_keys(keys, DEFAULT_MERGE_KEYS)
    assert set(merged) == set(theta0) and not any(key_matcher(DEFAULT_MERGE_KEYS)(k) for k in keys
                                                   if k.startswith("head."))
    # MNIST-shaped inputs: 1x28x28 -> 3x16x16 normalised with the folder's mean/std
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 28, 28, generator=g)
    adapted = model.backbone.adapter(x)
    assert adapted.shape == (32, 3, 16, 16)
    grey = nn.functional.interpolate(x * 0.3081 + 0.1307, size=(16, 16), mode="bilinear",
                                     align_corners=False)
    assert torch.allclose(adapted[:, 2:3], (grey - 0.6) / 0.3, atol=1e-5)
    with torch.no_grad():
        feats = model.backbone(x)
    assert feats.shape == (32, VIT["hidden_size"])
    # the pooled feature is ViT's own pooler on the CLS token of its own forward
    with torch.no_grad():
        ref = model.backbone.net(pixel_values=adapted).last_hidden_state[:, 0]
        ref = torch.tanh(nn.functional.linear(ref, theta0["backbone.net.pooler.dense.weight"],
                                              theta0["backbone.net.pooler.dense.bias"]))
    assert torch.allclose(feats, ref, atol=1e-5)
    # a few training steps move the backbone and lower the loss on a separable task
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    before = nn.functional.cross_entropy(model(x), y).item()
    fit(model, TensorDataset(x, y), steps=15, lr=0.05, batch_size=32, seed=0, desc=None)
    after = nn.functional.cross_entropy(model(x), y).item()
    assert after < before
    moved = model.state_dict()
    assert any(not torch.equal(moved[k], theta0[k]) for k in theta0)
    # and the run config accepts it for image tasks only
    assert RunConfig(model=name, tasks="rotate90,invert", num_clients=2).resolve().tasks == ["rotate90", "invert"]
    with pytest.raises(ConfigError, match="reads image inputs but task.*bbc-news"):
        RunConfig(model=name, suite="text", num_clients=2).resolve()


def test_a_clip_pair_keeps_its_image_tower(tmp_path):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2),
        vision_config=dict(image_size=8, patch_size=4, hidden_size=20, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    name = f"hf:{tmp_path / 'clip'}"
    spec = get_model_spec(name)
    assert (spec.input_kind, spec.feature_dim) == ("image", 20)
    theta0 = pretrained_backbone(name)
    assert theta0 and all(k.startswith("backbone.net.") for k in theta0)
    assert not any("text" in k for k in theta0)  # the text tower is not part of the backbone
    model = build_model(name, num_classes=3)
    model.load_state_dict(theta0, strict=False)
    with torch.no_grad():
        assert model(torch.randn(4, 1, 28, 28)).shape == (4, 3)


def test_hub_ids_offline_fail_with_one_line_naming_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-fl-merge-hf-home")  # nothing cached either
    with pytest.raises(ConfigError) as e:
        RunConfig(model="hf:fl-merge-tests/no-such-model", suite="text").resolve()
    msg = str(e.value)
    assert "'fl-merge-tests/no-such-model' is not a local folder" in msg
    assert "offline (HF_HUB_OFFLINE=1)" in msg and "pass the local folder" in msg
    assert "\n" not in msg


def test_hub_ids_online_load_the_id_and_report_a_failure_in_one_line(monkeypatch, tmp_path):
    from fl_merge.models import hf as hf_models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    _save_vit(tmp_path / "vit")
    real = transformers.AutoConfig.from_pretrained
    calls = []

    def hub(ref, local_files_only):  # stands in for the hub: the id resolves to the folder above
        calls.append((ref, local_files_only))
        if ref != "owner/tiny-vit":
            raise OSError("owner/absent is not a valid model identifier\nmore")
        return real(tmp_path / "vit")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", hub)
    spec = hf_models.hf_spec("hf:owner/tiny-vit", "owner/tiny-vit")
    assert calls == [("owner/tiny-vit", False)]  # online: the id itself, downloads allowed
    assert (spec.input_kind, spec.feature_dim) == ("image", VIT["hidden_size"])
    with pytest.raises(hf_models.HubUnavailableError,
                       match=r"could not load 'owner/absent' from the Hugging Face Hub "
                             r"\(owner/absent is not a valid model identifier\): check the id"):
        hf_models.hf_spec("hf:owner/absent", "owner/absent")
    # path-like names are never hub ids
    with pytest.raises(FileNotFoundError, match="no directory"):
        hf_models.hf_source("hf:./absent", "./absent")


class BatchNormAct2d(nn.BatchNorm2d):
    """Stand-in of timm.layers.norm_act.BatchNormAct2d (same structure and forward order:
    batch norm, then self.drop, then self.act), for machines without timm."""

    def __init__(self, num_features, act: nn.Module, drop: nn.Module | None = None, eps=1e-5):
        super().__init__(num_features, eps=eps)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


def _randomise(bn: nn.BatchNorm2d) -> None:
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    if bn.weight is not None:
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.uniform_(-1, 1)


def test_folding_keeps_timm_norm_act_activations_and_dropout():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), BatchNormAct2d(4, nn.SiLU(), nn.Dropout(0.3), eps=1e-3),
        nn.Sequential(nn.Conv2d(4, 5, 1), BatchNormAct2d(5, nn.ReLU6())),
        nn.Conv2d(5, 6, 1), nn.BatchNorm2d(6, affine=False), BatchNormAct2d(6, nn.PReLU(6)))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomise(m)
    x = torch.randn(2, 3, 8, 8)
    expected = net.eval()(x)  # the unfolded module itself, eval mode: the reference
    fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert isinstance(net[1], ChannelAffineAct) and isinstance(net[1].act, nn.SiLU)
    assert isinstance(net[1].drop, nn.Dropout) and isinstance(net[2][1].act, nn.ReLU6)
    assert torch.allclose(net(x), expected, atol=1e-5)
    # the activation is really applied: without it the output differs (SiLU/ReLU6 are not identity)
    net[2][1].act = nn.Identity()
    assert not torch.allclose(net(x), expected, atol=1e-3)
    # folded layers expose only parameters (plus the PReLU's own) and keep their names
    names = {k for k, _ in net.named_parameters()}
    assert {"1.weight", "1.bias", "5.act.weight", "4.weight"} <= names
    assert not any("running" in k or "num_batches" in k for k in net.state_dict())


def test_a_batchnorm_without_running_statistics_is_refused_by_name():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False)))
    with pytest.raises(ValueError, match="cannot fold BatchNorm '1.0': it keeps no running statistics"):
        fold_batchnorm(net)


def test_an_fp16_hf_image_model_stays_fp16_and_gives_float32_features(tmp_path):
    """Pixels go in in the weights' dtype, features come out float32 (the head's dtype),
    close to the same weights computed in float32."""
    folder = tmp_path / "vit16"
    _save_vit(folder).half().save_pretrained(folder)
    name = f"hf:{folder}"
    theta0 = pretrained_backbone(name)
    assert {v.dtype for v in theta0.values()} == {torch.float16}
    model = build_model(name, num_classes=2)
    model.load_state_dict(theta0, strict=False)
    assert {p.dtype for p in model.backbone.parameters()} == {torch.float16}
    reference = build_model(name, num_classes=2).float()
    reference.load_state_dict({k: v.float() for k, v in theta0.items()}, strict=False)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats, want = model.backbone(x), reference.backbone(x)
    assert feats.dtype == torch.float32 and torch.allclose(feats, want, atol=2e-2, rtol=2e-2)
    assert model(x).dtype == torch.float32
