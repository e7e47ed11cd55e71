"""Model registry: a model is a backbone builder, a per-task head, and the rule saying which
parameters are merged.

Every model is ``TaskModel(backbone, head)``: parameters under ``backbone.`` are shared and
merged; parameters under ``head.`` belong to one task (its own label space) and are never
merged. The base model theta0 is either pretrained here (the small MNIST CNN: built once and
cached) or published weights loaded offline (fl_merge/models/hub.py: EfficientNet-Lite0, MiniLM-L6,
and ``hf:``/``timm:``/``open_clip:`` local checkpoints).

This module is the registry only: the built-in models register themselves in
fl_merge/models/backbones.py and fl_merge/models/hub.py, which fl_merge.core.registration imports on the first lookup.

A model takes one input kind: ``image`` (float [N, 1, 28, 28], MNIST-normalised: the
MNIST-family tasks) or ``text`` (uint8 [N, L], UTF-8 bytes zero-padded: the text tasks).
Backbones adapt that input to what their weights expect (resize, channels, normalisation,
tokenisation).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from fl_merge.core.kernels import cache_key_part
from fl_merge.core.registration import MODEL_MODULES, BuiltinRegistry

MERGED_PREFIX = "backbone."
HEAD_PREFIX = "head."


def is_merged_key(key: str) -> bool:
    """True for shared backbone parameters (merged), False for per-task head parameters."""
    return key.startswith(MERGED_PREFIX)


class TaskModel(nn.Module):
    """backbone (shared, merged) -> head (per task, never merged)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 40  # a weakly pretrained base: tasks gain a lot from fine-tuning
    lr: float = 0.05
    batch_size: int = 64
    seed: int = 0


INPUT_KINDS = ("image", "text")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # The architecture; its weights are overwritten by theta0 (or a client's state) after.
    build_backbone: Callable[[], nn.Module]
    feature_dim: int
    input_kind: str = "image"
    # theta0 is either pretrained here on this data (inputs, labels, num_classes) ...
    pretrain_data: Callable[[], tuple[TensorDataset, int]] | None = None
    # ... or a backbone carrying published weights, loaded offline.
    load_pretrained: Callable[[], nn.Module] | None = None
    # Modules it imports and the install command that provides them (checked before a run).
    requires: tuple[str, ...] = ()
    install: str = ""

    def check_installed(self) -> None:
        """Raise ImportError naming the install command when a required module is missing."""
        import importlib.util

        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"model '{self.name}' needs {', '.join(missing)}: {self.install}")

    def __post_init__(self) -> None:
        if (self.pretrain_data is None) == (self.load_pretrained is None):
            raise ValueError(f"model '{self.name}': give exactly one of pretrain_data, load_pretrained")
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"model '{self.name}': input_kind must be one of {INPUT_KINDS}")


# Registered models and model families (names with a prefix, resolved on lookup); both load
# fl_merge.core.registration on first use (fl_merge/core/registration.py).
MODELS: MutableMapping[str, ModelSpec] = BuiltinRegistry(MODEL_MODULES)
FAMILIES: MutableMapping[str, tuple[Callable[[str], ModelSpec], str]] = BuiltinRegistry(MODEL_MODULES)


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model '{spec.name}' registered twice")
    MODELS[spec.name] = spec
    return spec


def register_model_family(prefix: str, resolve: Callable[[str], ModelSpec], usage: str) -> None:
    """Names starting with `prefix` (e.g. ``hf:``) are models built by ``resolve(name)``;
    `usage` (e.g. ``hf:<dir>``) is how error messages show the form."""
    if prefix in FAMILIES:
        raise ValueError(f"model family '{prefix}' registered twice")
    FAMILIES[prefix] = (resolve, usage)


class UnknownModelError(ValueError):
    pass


def get_model_spec(name: str) -> ModelSpec:
    """A registered model, or one of a registered family (fl_merge/models/hub.py: ``hf:<dir>``,
    ``timm:<arch>[@<file>]``, ``open_clip:<arch>@<file>``). Raises UnknownModelError."""
    if name in MODELS:
        return MODELS[name]
    forms = ", ".join(usage for _, usage in FAMILIES.values())
    if name == "???":  # Hydra's mandatory marker (configs/model/hf.yaml) left unset
        raise UnknownModelError(f"model.name is not set: give model.name={forms}")
    for prefix, (resolve, _) in FAMILIES.items():
        if name.startswith(prefix):
            return resolve(name)
    raise UnknownModelError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}"
                            + (f", or {forms}" if forms else ""))


def build_model(name: str, num_classes: int) -> TaskModel:
    spec = get_model_spec(name)
    return TaskModel(spec.build_backbone(), spec.feature_dim, num_classes)


# Bump when pretraining code changes what it produces: old cache entries are then ignored.
_PRETRAIN_CODE_VERSION = 2


def cache_root() -> Path:
    """Absolute cache directory: $FL_MERGE_CACHE, else $XDG_CACHE_HOME/fl-merge, else
    ~/.cache/fl-merge."""
    if os.environ.get("FL_MERGE_CACHE"):
        return Path(os.environ["FL_MERGE_CACHE"]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "fl-merge").resolve()


def base_model_path(name: str, cfg: PretrainConfig) -> Path:
    # the kernels decide the pretrained bits too (fl_merge/core/kernels.py): no reuse across them
    key = json.dumps({"model": name, **asdict(cfg), "code": _PRETRAIN_CODE_VERSION, **cache_key_part()},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "base" / f"{name}-{digest}.safetensors"


def pretrained_backbone(name: str, cfg: PretrainConfig = PretrainConfig(),
                        progress: bool = True) -> dict[str, torch.Tensor]:
    """theta0: the pretrained backbone's state dict with ``backbone.`` keys.

    A hub model's theta0 is its published weights. Ours is pretrained once (deterministic
    from cfg.seed) and cached at an absolute user path; an unreadable cache file is rebuilt,
    and the file is written atomically.
    """
    spec = get_model_spec(name)
    if spec.load_pretrained is not None:  # published weights: nothing to pretrain or cache
        backbone = spec.load_pretrained()
        return {f"{MERGED_PREFIX}{k}": v.detach().contiguous() for k, v in backbone.state_dict().items()}
    path = base_model_path(name, cfg)
    if path.exists():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            path.unlink(missing_ok=True)  # corrupt or partial: rebuild below
    torch.manual_seed(cfg.seed)
    data, num_classes = spec.pretrain_data()
    model = TaskModel(spec.build_backbone(), spec.feature_dim, num_classes)
    from fl_merge.models.training import fit

    # One thread: CPU kernels reduce in a thread-count-dependent order, so this keeps theta0
    # bit-identical across machines (same seed, same torch) at a few seconds' cost.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(model, data, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
            desc=f"pretraining {name}" if progress else None)
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if is_merged_key(k)}
    from fl_merge.core.safetensors_writer import save_tensors  # atomic: temp file, fsync, rename

    meta = {"model": name, **{k: str(v) for k, v in asdict(cfg).items()}}
    save_tensors(path, state, meta)
    return state

