"""``hf:<dir or hub id>``: transformers models as fl-merge backbones, text or image.

The source is a local folder (read offline, ``local_files_only``) or, when no such folder
exists, a Hugging Face Hub id such as ``google/vit-base-patch16-224`` (from_pretrained of the
id, online; offline, HF_HUB_OFFLINE=1 or the hub unreachable, one error naming the id and
saying to pass a local folder). The model's config says what it reads:

* an image model (its config, or its ``vision_config`` for CLIP-like pairs, has
  ``image_size`` and ``num_channels``: ViT, DeiT, DINOv2, a CLIP or SigLIP vision tower):
  task images are resized to the model's image size, repeated to its channels and normalised
  with the ``image_mean``/``image_std`` of its preprocessor_config.json (0.5 each when there is
  none, ViT's default); features are the model's pooled output (``pooler_output``), else the
  CLS token's last hidden state. A CLIP-like pair keeps only its image tower (``vision_model``).
* anything else is a text encoder: tokenised inside forward, mean-pooled over real tokens.

Dropout stays off during fine-tuning (the encoder is kept in eval mode): fine-tuning is
deterministic given the seed, like the image models of fl_merge/models/hub.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl_merge.data.offline import decode_texts
from fl_merge.models.image_layers import ImageAdapter
from fl_merge.models.registry import ModelSpec

TEXT_EXTRA = "pip install 'fl-merge[text]'"
TEXT_MAX_TOKENS = 64  # longer texts are truncated: a BBC article's first ~50 words name its topic
DEFAULT_IMAGE_NORM = 0.5  # ViT's default image_mean / image_std, when the model ships none
# A hub id: "name" or "owner/name" (letters, digits, - _ .), no leading dot or slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class MissingExtraError(ImportError):
    """A model needs a package that is not installed; the message says what to install."""


class HubUnavailableError(OSError):
    """An ``hf:<hub id>`` that cannot be had: the hub is offline or unreachable, or the id is
    unknown there. The message names the id and says to pass a local folder."""


def require(module: str, model: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"model '{model}' needs the '{module}' package: {install}") from None


def hub_offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (HF_HUB_OFFLINE or
    TRANSFORMERS_OFFLINE set to 1/true/yes/on, huggingface_hub's rule)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@dataclass(frozen=True)
class HFSource:
    """Where an ``hf:`` model comes from: `ref` is a resolved local folder or a hub id."""

    name: str  # the model name, hf:<...>, for messages
    ref: str
    local: bool

    @property
    def offline(self) -> bool:  # local_files_only for transformers
        return self.local or hub_offline()


def hf_source(name: str, rest: str) -> HFSource:
    """``hf:<rest>``: an existing local folder, else a hub id. A path-like `rest` (absolute,
    ./ or ~) that is no folder is FileNotFoundError."""
    path = Path(rest).expanduser()
    if path.is_dir():
        return HFSource(name, str(path.resolve()), True)
    if path.is_absolute() or rest.startswith((".", "~")) or path.exists() or not _HUB_ID.match(rest):
        raise FileNotFoundError(f"model '{name}': no directory {path} (give a local transformers "
                                "folder or a Hugging Face Hub id such as owner/name)")
    return HFSource(name, rest, False)


def _hub_error(src: HFSource, e: BaseException) -> HubUnavailableError:
    fix = "download it and pass the local folder, hf:/path/to/folder"
    if hub_offline():
        return HubUnavailableError(f"model '{src.name}': '{src.ref}' is not a local folder and the "
                                   f"Hugging Face Hub is offline (HF_HUB_OFFLINE=1): {fix}")
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return HubUnavailableError(f"model '{src.name}': could not load '{src.ref}' from the Hugging "
                               f"Face Hub ({cause}): check the id, or {fix}")


def _load(src: HFSource, what: str, loader: Any) -> Any:
    """loader.from_pretrained(src) with local_files_only where required; a hub failure is
    one HubUnavailableError."""
    if src.local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    try:
        return loader.from_pretrained(src.ref, local_files_only=src.offline)
    except (OSError, ValueError) as e:
        if src.local:
            raise FileNotFoundError(f"model '{src.name}': cannot read the {what} in {src.ref} "
                                    f"({str(e).strip().splitlines()[0] if str(e).strip() else e!r})") from None
        raise _hub_error(src, e) from None


def hf_config(src: HFSource) -> Any:
    transformers = require("transformers", src.name, TEXT_EXTRA)
    if src.local and not (Path(src.ref) / "config.json").is_file():
        raise FileNotFoundError(f"model '{src.name}': {src.ref} is not a transformers model directory "
                                "(no config.json)")
    return _load(src, "config", transformers.AutoConfig)


def vision_config(config: Any) -> Any | None:
    """The image part of a transformers config (itself, or its vision_config for a CLIP-like
    pair), or None for a text model."""
    sub = getattr(config, "vision_config", None)
    if sub is not None:
        return sub
    return config if hasattr(config, "image_size") and hasattr(config, "num_channels") else None


def _encoder(src: HFSource, config: Any, pretrained: bool) -> nn.Module:
    transformers = require("transformers", src.name, TEXT_EXTRA)
    if pretrained:
        return _load(src, "weights", transformers.AutoModel)
    return transformers.AutoModel.from_config(config)


# --------------------------------------------------------------------------- dtype

# A checkpoint saved in float16 or bfloat16 is built and loaded in that dtype (transformers
# 5 reads it from config.json in from_pretrained and from_config; 4.x would make float32), so
# a 1 GB fp16 model is 1 GB in every process, not 2 GB of float32. The backbone's features leave it as float32: the task head (nn.Linear) is
# float32, and pooling or a loss in half precision would lose digits.


def _weights_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's floating-point weights (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


# --------------------------------------------------------------------------- text

class SentenceEncoder(nn.Module):
    """A transformers encoder with mean pooling over real tokens (as sentence-transformers):
    uint8 UTF-8 bytes [N, L] -> decode -> tokenize (padded to the batch's longest, at most
    TEXT_MAX_TOKENS) -> encoder -> mean of last hidden states where attention_mask = 1."""

    # Tokenising inside forward cannot run under torch.func.vmap: per-example loops instead.
    supports_vmap = False

    def __init__(self, src: HFSource, pretrained: bool):
        super().__init__()
        self.encoder = _encoder(src, None if pretrained else hf_config(src), pretrained)
        self.encoder.eval()
        self.tokenizer = _tokenizer(src)

    def train(self, mode: bool = True) -> SentenceEncoder:
        super().train(mode)
        self.encoder.eval()  # dropout off (module docstring)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.tokenizer(decode_texts(x), padding=True, truncation=True,
                               max_length=TEXT_MAX_TOKENS, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        mask = batch["attention_mask"].to(device)
        hidden = self.encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        hidden = hidden.float()  # pooled in float32 whatever the weights' dtype (module note above)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@functools.lru_cache(maxsize=8)
def _tokenizer(src: HFSource):
    transformers = require("transformers", src.name, TEXT_EXTRA)
    return _load(src, "tokenizer", transformers.AutoTokenizer)


# --------------------------------------------------------------------------- image

def image_normalisation(src: HFSource, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel from the model's preprocessor_config.json; DEFAULT_IMAGE_NORM
    for each when it has none (or is a hub id that cannot be reached for that file)."""
    data: dict = {}
    if src.local:
        f = Path(src.ref) / "preprocessor_config.json"
        data = json.loads(f.read_text()) if f.is_file() else {}
    else:
        try:
            from huggingface_hub import hf_hub_download

            data = json.loads(Path(hf_hub_download(src.ref, "preprocessor_config.json",
                                                   local_files_only=src.offline)).read_text())
        except Exception:  # noqa: BLE001 (no such file, or no network: the defaults apply)
            data = {}

    def per_channel(key: str) -> tuple[float, ...]:
        value = data.get(key, DEFAULT_IMAGE_NORM)
        values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        return tuple(values * channels if len(values) == 1 else values)

    return per_channel("image_mean"), per_channel("image_std")


def _image_size(vision: Any) -> int:
    size = vision.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class HFImageBackbone(nn.Module):
    """A transformers image model (or a CLIP-like pair's image tower) as a feature extractor:
    adapter -> model(pixel_values) -> pooler_output (else the CLS token's last hidden state)."""

    def __init__(self, src: HFSource, pretrained: bool):
        super().__init__()
        config = hf_config(src)
        vision = vision_config(config)
        model = _encoder(src, config, pretrained)
        self.net = getattr(model, "vision_model", model)  # a CLIP-like pair: its image tower
        self.net.eval()
        channels = int(vision.num_channels)
        mean, std = image_normalisation(src, channels)
        self.adapter = ImageAdapter(_image_size(vision), mean, std, channels)

    def train(self, mode: bool = True) -> HFImageBackbone:
        super().train(mode)
        self.net.eval()  # dropout off (module docstring)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(pixel_values=self.adapter(x).to(_weights_dtype(self.net)))
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float()


def image_feature_dim(vision: Any) -> int:
    """The pooled feature size: ViT's pooler may project to pooler_output_size."""
    size = getattr(vision, "pooler_output_size", None) or getattr(vision, "hidden_size", None)
    return int(size if size is not None else vision.hidden_sizes[-1])  # ConvNeXt-like: last stage


def hf_spec(name: str, rest: str) -> ModelSpec:
    """The ModelSpec of ``hf:<rest>``, an image or a text backbone as its config says; reads
    only the config (no weights)."""
    src = hf_source(name, rest)
    config = hf_config(src)
    vision = vision_config(config)
    if vision is not None:
        return ModelSpec(name, lambda: HFImageBackbone(src, False), image_feature_dim(vision),
                         input_kind="image", load_pretrained=lambda: HFImageBackbone(src, True),
                         requires=("transformers",), install=TEXT_EXTRA)
    return ModelSpec(name, lambda: SentenceEncoder(src, False), int(config.hidden_size),
                     input_kind="text", load_pretrained=lambda: SentenceEncoder(src, True),
                     requires=("transformers",), install=TEXT_EXTRA)
