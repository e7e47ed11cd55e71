"""The built-in backbones pretrained here on MNIST: the small CNN (the default model) and a
wide MLP for deployment measurements. Importing this module registers them (fl_merge.core.registration
imports it); theta0 is pretrained on MNIST train images [0, PRETRAIN_POOL), the tasks draw
from the rest (fl_merge/tasks/image.py)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_merge.models.registry import ModelSpec, register_model

PRETRAIN_POOL = 30000  # MNIST train images [0, 30000) are the base model's pretraining data
WIDE_MLP_WIDTH = 7168  # 784*W + W*W + W*128 (+ biases) = 57.9M float32 parameters = 232 MB


def mnist_cnn_backbone() -> nn.Module:
    """Two conv blocks and a 128-d feature layer for 1x28x28 inputs (~210k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
    )


def wide_mlp_backbone(width: int = WIDE_MLP_WIDTH) -> nn.Module:
    """A plain MLP 784 -> W -> W -> 128 for 1x28x28 inputs; at the default width its backbone is
    ~232 MB of float32, for measuring a >= 200 MB model through deployment. Never a default."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(28 * 28, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 128), nn.ReLU(),
    )


def mnist_pretrain_data() -> tuple[TensorDataset, int]:
    """The base model's pretraining data: the first PRETRAIN_POOL MNIST train images, 10 classes."""
    from fl_merge.data.offline import load_mnist, mnist_to_tensor

    m = load_mnist()
    n = PRETRAIN_POOL
    return TensorDataset(mnist_to_tensor(m["train_images"][:n]),
                         torch.tensor(m["train_labels"][:n], dtype=torch.int64)), 10


register_model(ModelSpec("mnist-cnn", mnist_cnn_backbone, 128, pretrain_data=mnist_pretrain_data))
register_model(ModelSpec("wide-mlp", wide_mlp_backbone, 128, pretrain_data=mnist_pretrain_data))
