"""One dataset split across K clients: data heterogeneity as a knob.

The split is done by flwr-datasets partitioners on an in-memory `datasets.Dataset` of the
task's training pool: IID, Dirichlet(alpha) over labels (smaller alpha = more skewed), or
pathological (each client sees only `classes_per_client` classes), or shared (no split:
every client trains on the whole pool, so clients differ only by seed, lr and steps: DiWA). Every client shares the
task's label space and one frozen head (a probe fitted on the task's public validation
split, like a zero-shot head everyone has), and is scored on the task's global val/test.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fl_merge.tasks.registry import SplitSizes, TaskData, load_task

SCHEMES = ("iid", "dirichlet", "pathological", "shared")


def make_partitioner(scheme: str, num_partitions: int, alpha: float = 0.5,
                     classes_per_client: int = 2, seed: int = 0):
    """The flwr-datasets partitioner for `scheme` (partitioning by the 'label' column)."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if scheme == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if scheme == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                    alpha=alpha, min_partition_size=10, seed=seed)
    if scheme == "pathological":
        return PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                       num_classes_per_partition=classes_per_client,
                                       class_assignment_mode="first-deterministic", seed=seed)
    raise ValueError(f"unknown partition scheme '{scheme}'; known: {', '.join(SCHEMES)}")


def partition_indices(labels: np.ndarray, scheme: str, num_partitions: int, partition_id: int,
                      alpha: float = 0.5, classes_per_client: int = 2, seed: int = 0) -> np.ndarray:
    """Indices into `labels` of partition `partition_id` (sorted). "shared": every client
    gets every index (K runs on the SAME data, as DiWA and model soups fine-tune)."""
    if scheme == "shared":
        return np.arange(len(labels), dtype=np.int64)
    import datasets

    ds = datasets.Dataset.from_dict({"idx": np.arange(len(labels)), "label": np.asarray(labels)})
    # IidPartitioner cuts contiguous chunks: shuffle (seeded) so order carries no labels.
    ds = ds.shuffle(seed=seed)
    part = make_partitioner(scheme, num_partitions, alpha, classes_per_client, seed)
    part.dataset = ds
    return np.sort(np.asarray(part.load_partition(partition_id)["idx"], dtype=np.int64))


@functools.lru_cache(maxsize=8)
def load_partitioned_task(task: str, scheme: str, num_partitions: int, partition_id: int,
                          alpha: float = 0.5, classes_per_client: int = 2, seed: int = 0,
                          pool: int = 8000) -> TaskData:
    """Client `partition_id`'s share of `task`: train = its partition of a training pool of
    `pool` examples; val/test = the task's global splits; probe = the val split."""
    full = load_task(task, seed, SplitSizes(train=pool))
    x, y = full.train.tensors
    idx = torch.as_tensor(partition_indices(y.numpy(), scheme, num_partitions, partition_id,
                                            alpha, classes_per_client, seed))
    return replace(full, name=f"{task}/{partition_id}", train=TensorDataset(x[idx], y[idx]),
                   probe=full.val)
