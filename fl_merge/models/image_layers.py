"""Layers shared by the published image backbones (fl_merge/models/hub.py, fl_merge/models/hf.py):
the input adapter and BatchNorm folding.

`fold_batchnorm` replaces every BatchNorm2d by the per-channel affine map it computes in eval
mode, so fine-tuning and merging see only parameters (no running statistics drifting with a
client's batches, no integer counters to average). timm's ``BatchNormAct2d`` is a BatchNorm2d
subclass whose forward goes on with ``self.drop`` then ``self.act``
(timm/layers/norm_act.py: batch_norm -> drop -> act); its fold keeps both, in that order.
"""

from __future__ import annotations

import torch
from torch import nn

from fl_merge.data.offline import MNIST_MEAN, MNIST_STD


class ImageAdapter(nn.Module):
    """Task images (float [N, C, H, W], C = 1 or 3, MNIST-normalised as fl_merge.data.offline makes
    them) -> what the pretrained weights expect: back to [0, 1], bilinear resize to `size`,
    grey repeated to `channels` (or colour averaged to grey when the model reads one channel),
    (x - mean) / std. No parameters, and its constants stay out of the state dict."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], channels: int = 3):
        super().__init__()
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"image mean/std need {channels} values (one per channel), "
                             f"got {len(mean)} and {len(std)}")
        self.size = size
        self.channels = channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * MNIST_STD + MNIST_MEAN
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                          align_corners=False)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        return (x - self.mean) / self.std


class ChannelAffine(nn.Module):
    """y = x * weight[c] + bias[c]: a BatchNorm with its statistics folded in (eval mode)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ChannelAffineAct(ChannelAffine):
    """A folded norm-act layer (timm's BatchNormAct2d): act(drop(x * weight[c] + bias[c])).
    `drop` and `act` are the original module's own submodules, kept as they were."""

    def __init__(self, num_features: int, drop: nn.Module, act: nn.Module):
        super().__init__(num_features)
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _folded(bn: nn.BatchNorm2d, where: str) -> ChannelAffine:
    """The ChannelAffine(Act) equal to `bn` in eval mode:
    weight = gamma / sqrt(var + eps), bias = beta - mean * weight (gamma = 1, beta = 0 when
    the BatchNorm has no affine parameters)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold BatchNorm '{where}': it keeps no running statistics "
                         "(track_running_stats=False), so eval mode uses each batch's own")
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if drop is None and act is None:
        folded = ChannelAffine(bn.num_features)
    else:
        folded = ChannelAffineAct(bn.num_features, drop or nn.Identity(), act or nn.Identity())
    ref = bn.running_var
    gamma = bn.weight if bn.weight is not None else torch.ones_like(ref)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(ref)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    folded.weight.data = scale.detach().clone()
    folded.bias.data = (beta - bn.running_mean * scale).detach().clone()
    return folded


@torch.no_grad()
def fold_batchnorm(module: nn.Module, prefix: str = "") -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place), subclasses included, by the layer equal
    to it in eval mode (`_folded`); a norm-act subclass keeps its drop and act (module
    docstring). Returns `module`."""
    for name, child in list(module.named_children()):
        where = f"{prefix}{name}"
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _folded(child, where))
        else:
            fold_batchnorm(child, f"{where}.")
    return module
