"""The built-in image tasks (suites ``mnist8``, ``mnist-near``/``-mid``/``-far``, ``headroom``, ``vision8``).

``mnist8`` makes 8 tasks from real MNIST (second half of the training set, so disjoint from
the base model's pretraining images) and scikit-learn's 8x8 digits: geometric, photometric
and label-space shifts of handwritten digits. All splits are deterministic from (task name,
seed). Importing this module registers them (fl_merge.core.registration imports it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fl_merge.tasks.registry import SUITES, SplitSizes, TaskBuilder, TaskData, _stable_seed, register_task
from fl_merge.models.backbones import PRETRAIN_POOL
from fl_merge.data.offline import load_mnist, load_sklearn_digits, mnist_to_tensor


def _mnist_task(
    name: str,
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray],
    classes: tuple[int, ...] = tuple(range(10)),
    relabel: Callable[[np.ndarray], np.ndarray] | None = None,
    num_classes: int | None = None,
) -> TaskBuilder:
    """A task on MNIST digits `classes`, images passed through `transform` (float [N,28,28]
    in [0,1] -> same), labels through `relabel` (default: index in `classes`)."""

    def build(seed: int, sizes: SplitSizes) -> TaskData:
        m = load_mnist()
        rng = np.random.default_rng(_stable_seed(name, seed))
        # The transform's own randomness (e.g. a fixed permutation) depends on the task only.
        trng = np.random.default_rng(_stable_seed(name, "transform"))
        pool_labels = m["train_labels"][PRETRAIN_POOL:]
        pool = np.flatnonzero(np.isin(pool_labels, classes)) + PRETRAIN_POOL
        pick = rng.choice(pool, size=sizes.train + sizes.val, replace=False)
        test_pool = np.flatnonzero(np.isin(m["test_labels"], classes))
        test_pick = rng.choice(test_pool, size=min(sizes.test, len(test_pool)), replace=False)

        def make(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
            x = transform(images.astype(np.float32) / 255.0, trng)
            y = relabel(labels) if relabel else np.searchsorted(np.array(classes), labels)
            return TensorDataset(mnist_to_tensor(np.clip(x, 0.0, 1.0)),
                                 torch.as_tensor(y, dtype=torch.int64))

        tr, va = pick[: sizes.train], pick[sizes.train :]
        return TaskData(
            name,
            num_classes or len(classes),
            make(m["train_images"][tr], m["train_labels"][tr]),
            make(m["train_images"][va], m["train_labels"][va]),
            make(m["test_images"][test_pick], m["test_labels"][test_pick]),
        )

    return build


def _rotate90(x: np.ndarray, _: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(x, k=1, axes=(1, 2)))


def _rotate180(x: np.ndarray, _: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(x[:, ::-1, ::-1])


def _invert(x: np.ndarray, _: np.random.Generator) -> np.ndarray:
    return 1.0 - x


def _patch_shuffle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cut into a 4x4 grid of 7x7 patches and reorder them by one fixed permutation."""
    n = x.shape[0]
    patches = x.reshape(n, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(n, 16, 7, 7)
    perm = np.random.default_rng(_stable_seed("patch-shuffle-perm")).permutation(16)
    return patches[:, perm].reshape(n, 4, 4, 7, 7).transpose(0, 1, 3, 2, 4).reshape(n, 28, 28)


def _blur(x: np.ndarray, _: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=(0, 1.5, 1.5))


def _noise(x: np.ndarray, _: np.random.Generator) -> np.ndarray:
    # Noise differs per image but is reproducible: seeded by the images themselves.
    rng = np.random.default_rng(_stable_seed("noise", x.shape, float(x.sum())))
    return x + rng.normal(0.0, 0.6, size=x.shape).astype(np.float32)


def _rotate(angle: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def rotate(x: np.ndarray, _: np.random.Generator) -> np.ndarray:
        from scipy.ndimage import rotate as nd_rotate

        return nd_rotate(x, angle, axes=(1, 2), reshape=False, order=1)

    return rotate


register_task("rotate90")(_mnist_task("rotate90", _rotate90))
register_task("rotate15")(_mnist_task("rotate15", _rotate(15.0)))
register_task("rotate-15")(_mnist_task("rotate-15", _rotate(-15.0)))
register_task("invert")(_mnist_task("invert", _invert))
register_task("patch-shuffle")(_mnist_task("patch-shuffle", _patch_shuffle))
register_task("blur")(_mnist_task("blur", _blur))
register_task("noise")(_mnist_task("noise", _noise))
register_task("parity")(
    _mnist_task("parity", lambda x, _: x, relabel=lambda y: y % 2, num_classes=2)
)
register_task("rot180-5to9")(_mnist_task("rot180-5to9", _rotate180, classes=(5, 6, 7, 8, 9)))


@register_task("digits8x8")
def _digits8x8(seed: int, sizes: SplitSizes) -> TaskData:
    """scikit-learn's 8x8 digits upsampled to a 20x20 box centred in 28x28, as in MNIST."""
    from scipy.ndimage import zoom

    images, labels = load_sklearn_digits()
    big = zoom(images, (1, 2.5, 2.5), order=1)
    x = np.zeros((len(images), 28, 28), dtype=np.float32)
    x[:, 4:24, 4:24] = np.clip(big, 0, 1)
    rng = np.random.default_rng(_stable_seed("digits8x8", seed))
    order = rng.permutation(len(labels))
    # 1797 images in all: keep the requested proportions, at most 60/15/25 %.
    n_train = min(sizes.train, int(0.6 * len(order)))
    n_val = min(sizes.val, int(0.15 * len(order)))
    n_test = min(sizes.test, len(order) - n_train - n_val)
    parts = np.split(order, [n_train, n_train + n_val, n_train + n_val + n_test])[:3]

    def make(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(mnist_to_tensor(x[idx]), torch.as_tensor(labels[idx], dtype=torch.int64))

    return TaskData("digits8x8", 10, *(make(p) for p in parts))


# Suites of increasing task dissimilarity (4 tasks each): small perturbations of the same
# digits and labels; geometric and label-space changes; changes that break the image
# statistics the base model learned.
SUITES["mnist-near"] = ["rotate15", "rotate-15", "blur", "noise"]
SUITES["mnist-mid"] = ["rotate90", "rot180-5to9", "parity", "digits8x8"]
SUITES["mnist-far"] = ["invert", "patch-shuffle", "rotate90", "digits8x8"]
SUITES["mnist8"] = [
    "rotate90", "invert", "patch-shuffle", "digits8x8",
    "blur", "noise", "parity", "rot180-5to9",
]
# Where merging has headroom (docs/headroom.md): three tasks that each gain 12-31 points from
# fine-tuning and whose task vectors are nearly orthogonal; with 50 local steps Task
# Arithmetic keeps about half of the gain (configs/experiment/headroom.yaml).
SUITES["headroom"] = ["rotate90", "invert", "patch-shuffle"]
# The same idea chosen cleanly (docs/headroom.md "How the suite is chosen"): on validation
# only, at design seeds never reported, by a rule fixed beforehand; 150 local steps
# (configs/experiment/headroom_v2.yaml).
SUITES["headroom-v2"] = ["rotate90", "invert", "noise", "patch-shuffle"]
# The same 8 tasks, for the ImageNet-pretrained EfficientNet-Lite0 (configs/experiment/vision8).
SUITES["vision8"] = list(SUITES["mnist8"])
