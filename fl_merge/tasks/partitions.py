"""One dataset split across K clients: data heterogeneity as a knob.

The split is done by flwr-datasets partitioners on an in-memory `datasets.Dataset` of the
task's training pool: IID, Dirichlet(alpha) over labels (smaller alpha = more skewed), or
pathological (each client sees only `classes_per_client` classes), or shared (no split:
every client trains on the whole pool, so clients differ only by seed, lr and steps: DiWA). Every client shares the
task's label space and one frozen head (a probe fitted on public training examples no client
holds, like a zero-shot head everyone has; not on the validation split that selects lambda),
and is scored on the task's global val/test.
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


PROBES = ("heldout", "val")


def check_probe(probe: str) -> str:
    """`probe` when it names a probe split; ValueError naming the known ones otherwise."""
    if probe not in PROBES:
        raise ValueError(f"partition-probe must be one of {', '.join(PROBES)}, got '{probe}'")
    return probe


@functools.lru_cache(maxsize=8)
def load_partitioned_task(task: str, scheme: str, num_partitions: int, partition_id: int,
                          alpha: float = 0.5, classes_per_client: int = 2, seed: int = 0,
                          pool: int = 8000, probe: str = "heldout") -> TaskData:
    """Client `partition_id`'s share of `task`: train = its partition of a training pool of
    `pool` examples; val/test = the task's global splits; the head's probe data (`probe`):

    * "heldout" (default): public examples of the task's training data that no client holds
      and that are not the validation split which selects lambda and the knobs (as many as
      the validation split has; the pool shrinks to fit when the task has fewer);
    * "val": the validation split itself (what runs did before December 2026; the head is
      then fitted on the split that also chooses the setting)."""
    if check_probe(probe) == "val":
        full = load_task(task, seed, SplitSizes(train=pool))
        x, y = full.train.tensors
        held = full.val
    else:
        n_probe = SplitSizes().val
        full = load_task(task, seed, SplitSizes(train=pool + n_probe))
        x, y = full.train.tensors
        n_probe = min(n_probe, len(full.val)) if len(y) < pool + n_probe else n_probe
        n_pool = min(pool, len(y) - n_probe)
        if n_pool < 10 * num_partitions:
            raise ValueError(f"task '{task}' has {len(y)} training examples: too few for a probe "
                             f"split of {n_probe} and {num_partitions} clients; lower num-clients "
                             f"or use partition-probe=val")
        held = TensorDataset(x[n_pool:n_pool + n_probe], y[n_pool:n_pool + n_probe])
        x, y = x[:n_pool], y[:n_pool]
    idx = torch.as_tensor(partition_indices(y.numpy(), scheme, num_partitions, partition_id,
                                            alpha, classes_per_client, seed))
    return replace(full, name=f"{task}/{partition_id}", train=TensorDataset(x[idx], y[idx]),
                   probe=held)
