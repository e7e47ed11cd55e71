"""The fl-merge ClientApp: one task per client, fine-tuned locally, scored on request.

Which task a node runs is ``tasks[partition-id]`` (task list from the server's config,
partition id from the node config, as in simulation and ``--node-config`` deployments).
Per-client training values arrive as a scalar (all clients alike) or a list indexed by
partition id: that is how training heterogeneity travels in one shared message.
"""

from __future__ import annotations

import dataclasses
import time
from logging import INFO
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from torch.utils.data import TensorDataset

from fl_merge.io.update_cache import entry_path, load_update, save_update, state_digest, update_key
from .checkpoint_client import checkpoint_update
from fl_merge.tasks.partitions import load_partitioned_task
from fl_merge.tasks.registry import TaskData, load_task, task_fingerprint
from .training import (
    CandidateModel,
    LocalTrainConfig,
    fine_tune,
    mean_gradient,
    model_for_task,
    trained_statistics,
)
from fl_merge.round.attacks import AttackPlan, attack_update, parse_plan
from fl_merge.round.attacks import label_flip as flip_labels
from fl_merge.io.client_checkpoints import checkpoint_for
from fl_merge.models.device import client_device
from fl_merge.models.evaluation import evaluate
from fl_merge.config.plugins import load_run_plugins
from fl_merge.round.keys import DEFAULT_MERGE_KEYS, key_matcher
from fl_merge.round.prescreen import FRACTION_KEY, first_fraction
from fl_merge.round.protocol import PROTOCOL_KEY, PROTOCOL_VERSION
from fl_merge.core.task_vectors import EXTRA_PREFIX
from . import chunked
from .grid_scoring import score_grid

app = ClientApp()

# Logged by a client as it starts its local SGD steps (and after it stored the update): on a
# SuperNode this lands in the SuperNode's output, which is how an operator (or a fault test)
# sees that a node is training right now, not still loading, and that its update is safe.
TRAINING_LINE = "fl-merge client: partition {pid} ({task}) training {steps} local steps"
CACHED_LINE = "fl-merge client: partition {pid} update stored in the client-update cache: {path}"


def _partition_id(context: Context, config: ConfigRecord) -> int:
    """This node's index into the run's task list.

    Simulation gives every node 'partition-id' (and 'num-partitions'). A deployed SuperNode
    sets them with --node-config, or names its task instead ('task=mnist-rot15'): its index
    is then that task's position in the run's task list.
    """
    node = context.node_config
    tasks = [str(t) for t in config["tasks"]] if "tasks" in config else []
    if "task" in node:
        task = str(node["task"])
        if task not in tasks:
            raise ValueError(f"node config task '{task}' is not one of this run's tasks {tasks}")
        return tasks.index(task)
    if "partition-id" not in node:
        raise ValueError("node config lacks 'partition-id' (or 'task'): start the SuperNode with "
                         "--node-config 'partition-id=<i> num-partitions=<K>'")
    pid = int(node["partition-id"])
    if "num-partitions" in node and tasks and int(node["num-partitions"]) != len(tasks):
        raise ValueError(f"node config num-partitions={node['num-partitions']} but the run has "
                         f"{len(tasks)} clients (num-clients)")
    return pid


def _cache_dir(context: Context) -> Path | None:
    """A node-local cache directory from node config 'cache-dir' (default: $FL_MERGE_CACHE)."""
    value = context.node_config.get("cache-dir")
    return Path(str(value)).expanduser() if value else None


def _pick(config: ConfigRecord, key: str, pid: int) -> Any:
    """A per-client value: scalar for everyone, or the list entry for this partition."""
    if key not in config:
        raise ValueError(f"training config lacks '{key}'")
    value = config[key]
    if isinstance(value, list):
        if pid >= len(value):
            raise ValueError(f"'{key}' has {len(value)} values but this is partition {pid}")
        return value[pid]
    return value


def task_for(config: ConfigRecord, pid: int) -> TaskData:
    """tasks[pid] (data=tasks), or partition pid of one task split across all clients."""
    tasks = list(config["tasks"])
    if pid >= len(tasks):
        raise ValueError(f"partition-id {pid} but the run has only {len(tasks)} tasks")
    seed = int(config.get("data-seed", 0))
    scheme = str(config.get("data", "tasks"))
    if scheme == "tasks":
        return load_task(tasks[pid], seed)
    return load_partitioned_task(
        str(config["partition-task"]), scheme, len(tasks), pid, float(config["alpha"]),
        int(config["classes-per-client"]), seed, int(config["partition-pool"]),
        str(config.get("partition-probe", "heldout")))


def _is_merged(config: Mapping[str, Any]):
    """The server's merge-key patterns (sent in the train config), default backbone.*."""
    return key_matcher([str(p) for p in config.get("merge-keys", DEFAULT_MERGE_KEYS)])


def _limit_threads() -> None:
    # Simulated clients share the machine's cores: one thread each avoids oversubscription.
    torch.set_num_threads(1)


def _receive(msg: Message, context: Context) -> tuple[ConfigRecord, int]:
    """What every handler does first, before it builds a task or a model: one thread, the
    run's plugins registered in this process (a Ray worker or a SuperNode is not the process
    that resolved the run config), and (the message's config, this node's partition id)."""
    _limit_threads()
    config = msg.content["config"]
    load_run_plugins(config)
    return config, _partition_id(context, config)


def attack_plan(config: Mapping[str, Any]) -> AttackPlan:
    """The run's attackers and faults (fl_merge.round.attacks), from the training config."""
    return parse_plan(str(config.get("attack", "")), str(config.get("attackers", "")),
                      str(config.get("attack-params", "")), str(config.get("faults", "")),
                      len(list(config["tasks"])), float(config.get("fault-delay", 0.0)))


def local_train(config: Mapping[str, Any], pid: int, theta0: dict[str, torch.Tensor],
                cache_dir: Path | None = None, node_config: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Client `pid`'s whole training step, Flower-free: attach its head to theta0,
    fine-tune, and return (full local weights + "extra.<name>." arrays, metrics).

    A checkpoint client (node-config 'checkpoint', else config 'client-checkpoints'[pid];
    fl_merge/io/client_checkpoints.py) does not train: its checkpoint is the fine-tuned model.

    With config "cache" true (the default) an identical earlier update is reused from the
    client-update cache (metrics then carry cached=1) instead of training again.
    An attacker (config "attack"/"attackers") trains honestly (label_flip: on flipped
    labels), then replaces its task vector; the cache holds the honest update.
    """
    load_run_plugins(config)  # this process's registry: the run's own plugins
    plan = attack_plan(config)
    label_flip = plan.attacks(pid) and plan.attack == "label_flip"
    ckpt = checkpoint_for(node_config or {}, [str(p) for p in config.get("client-checkpoints", [])], pid)
    if ckpt and label_flip:
        raise ValueError(f"partition {pid} brings a checkpoint ({ckpt}): it cannot train on flipped labels")
    if ckpt:
        state, metrics = checkpoint_update(config, pid, theta0, ckpt, task_for(config, pid),
                                           int(_pick(config, "seed", pid)), node_config)
    else:
        state, metrics = _train(config, pid, theta0, cache_dir, label_flip=label_flip)
    if plan.attacks(pid):
        metrics["attacker"] = 1
        if plan.where == "client":
            is_merged = _is_merged(config)
            tau = {k: state[k] - v for k, v in theta0.items() if is_merged(k)}
            bad = attack_update(plan, tau, seed=int(_pick(config, "seed", pid)))
            state = {**state, **{k: theta0[k] + v for k, v in bad.items()}}
    return state, metrics


def update_spec(config: Mapping[str, Any], pid: int, cfg: LocalTrainConfig,
                label_flip: bool = False) -> dict[str, Any]:
    """What identifies client `pid`'s update in the client-update cache (with theta0's
    digest): its task and data, model, training values and the extras asked for."""
    tasks = list(config["tasks"])
    spec = {
        "task": tasks[pid] if pid < len(tasks) else None, "pid": pid, "num-clients": len(tasks),
        **{k: config.get(k) for k in ("model", "data", "data-seed", "partition-task", "alpha",
                                      "classes-per-client", "partition-pool", "compute-grad0",
                                      "grad0-samples", "compute-fisher", "fisher-samples")},
        # the head's probe data decides the pool (fl_merge/tasks/partitions.py); runs before it
        # existed fitted on val and keep their cache keys
        **({"partition-probe": config.get("partition-probe", "heldout")}
           if config.get("data", "tasks") != "tasks" and config.get("partition-probe", "heldout") != "val" else {}),
        # Grams only when asked: every other update keeps its cache key from before they existed
        **({k: config.get(k) for k in ("compute-gram", "gram-samples")} if config.get("compute-gram") else {}),
        "steps": cfg.steps, "lr": cfg.lr, "batch-size": cfg.batch_size, "seed": cfg.seed,
        **({"label-flip": True} if label_flip else {}),
        **({"plugins": str(config["plugins"])} if config.get("plugins") else {}),
    }
    # A task from data (docs/data.md) keys the cache by its files' state too: edit the CSV,
    # and the client trains again. Registered tasks add nothing (their keys are unchanged).
    task_name = spec["task"] if str(config.get("data", "tasks")) == "tasks" else config.get("partition-task")
    if task_name and (data_state := task_fingerprint(str(task_name))):
        spec["task-data"] = data_state
    return spec


def train_values(config: Mapping[str, Any], pid: int) -> LocalTrainConfig:
    """Client `pid`'s training values from the (per-client or shared) config entries."""
    return LocalTrainConfig(
        steps=int(_pick(config, "local-steps", pid)),
        lr=float(_pick(config, "lr", pid)),
        batch_size=int(_pick(config, "batch-size", pid)),
        seed=int(_pick(config, "seed", pid)),
    )


def cached_clients(config: Mapping[str, Any], theta0: Mapping[str, torch.Tensor],
                   cache_dir: Path | None = None) -> list[bool]:
    """Per client of the training config: whether its honest update is already in the
    cache (it would not train). Lets a long run be checked before it starts."""
    digest = state_digest(theta0)
    return [entry_path(update_key(digest, update_spec(config, pid, train_values(config, pid))),
                       cache_dir).exists() for pid in range(len(list(config["tasks"])))]


def _train(config: Mapping[str, Any], pid: int, theta0: dict[str, torch.Tensor],
           cache_dir: Path | None, label_flip: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The honest (or label-flipped) update, from the cache when an identical one exists."""
    cfg = train_values(config, pid)
    use_cache = bool(config.get("cache", True))
    spec = update_spec(config, pid, cfg, label_flip)
    key = update_key(state_digest(theta0), spec) if use_cache else ""
    if use_cache and (hit := load_update(key, cache_dir)) is not None:
        state, metrics = hit
        return state, {**metrics, "cached": 1}
    task = task_for(config, pid)
    if label_flip:
        # Train on y -> C-1-y, but keep the probe head fitted on the true labels: the attack
        # is in the backbone's update, not in a head that would undo it.
        x, y = task.train.tensors
        task = dataclasses.replace(task, probe=task.probe or task.train,
                                   train=TensorDataset(x, flip_labels(y, task.num_classes)))
    t0 = time.perf_counter()
    device = client_device(config.get("device"))
    model = model_for_task(str(config["model"]), task, theta0, cfg.seed, device)
    extras: dict[str, dict] = {}
    if bool(config.get("compute-grad0", False)):
        # The gradient at theta0, before any local step: for gradient dissimilarity.
        extras["grad0"] = mean_gradient(model, task.train, int(config.get("grad0-samples", 1024)))
    log(INFO, TRAINING_LINE.format(pid=pid, task=spec["task"], steps=cfg.steps))
    metrics: dict[str, Any] = fine_tune(model, task, cfg)
    metrics.update({
        "num-examples": len(task.train),
        "lr": cfg.lr,
        "batch-size": cfg.batch_size,
        "seed": cfg.seed,
        "partition-id": pid,
        "train-seconds": time.perf_counter() - t0,
    })
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    extras.update(trained_statistics(model, task.train, config, cfg.seed))  # fisher, gram
    # Extra per-client arrays travel in the same ArrayRecord under "extra.<name>.":
    # Flower's strategies expect exactly one ArrayRecord per reply.
    for name, arrays in extras.items():
        state.update({f"{EXTRA_PREFIX}{name}.{k}": v.detach().cpu() for k, v in arrays.items()})
    if use_cache:
        path = save_update(key, state, metrics, cache_dir)
        log(INFO, CACHED_LINE.format(pid=pid, path=path))
    return state, {**metrics, "cached": 0}


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, pid = _receive(msg, context)
    fault = attack_plan(config).faults.get(pid)
    if fault == "crash":
        raise RuntimeError(f"injected fault: partition {pid} crashed during training")
    theta0 = chunked.theta0(config, context) if chunked.holds_chunks(config) else \
        msg.content["arrays"].to_torch_state_dict()
    state, metrics = local_train(config, pid, theta0, _cache_dir(context), context.node_config)
    # Announce the grid evaluation capability (docs/protocol.md): the server then sends
    # theta0 + each Delta once + the eta grid instead of one model per candidate.
    metrics[PROTOCOL_KEY] = PROTOCOL_VERSION
    is_merged = _is_merged(config)
    if fault == "nan":
        state = {k: torch.full_like(v, float("nan")) if is_merged(k) else v for k, v in state.items()}
    elif fault == "malformed":
        first = next(k for k in state if is_merged(k))
        state = {**state, first: state[first].flatten()[:-1]}  # wrong shape
    elif fault == "timeout":
        time.sleep(float(config.get("fault-delay", 0.0)))
    if chunked.holds_chunks(config):  # the weights stay here; the server asks for each group
        kept = chunked.keep_update(config, context, state, metrics)
        return Message(RecordDict({"metrics": MetricRecord(kept)}), reply_to=msg)
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate_model(msg: Message, context: Context) -> Message:
    """Score the received model.

    With a 'delta' ArrayRecord (and maybe 'delta-1', 'delta-2', ... for more methods) and an
    'etas' list, score theta + eta * delta for every delta and eta on config 'splits'
    (default val and test), each Delta sent once. 'etas' is one grid for every delta, or,
    with 'etas-per-delta' (one count per delta), consecutive slices: delta i gets the next
    etas-per-delta[i] etas. Reply lists "<split>-accuracy"/"<split>-loss" run delta-major;
    with test among the splits also "test-correct": every candidate's 0/1 per test example,
    concatenated in that order (for paired bootstrap CIs; docs/protocol.md).
    Without a delta, score the received model on config 'split' (default test). With
    chunked messages (config 'chunk-theta0') the message holds config only: theta0, this
    client's per-task parameters and the Deltas are node-local files (clients/chunked.py)."""
    config, pid = _receive(msg, context)
    task = task_for(config, pid)
    model_name = str(config["model"])
    device = client_device(config.get("device"))
    seed = int(_pick(config, "seed", pid)) if "seed" in config else 0  # for a probe head only
    metrics: dict[str, Any] = {"num-examples": len(task.test), "partition-id": pid}
    records = msg.content.array_records
    if chunked.holds_chunks(config):  # theta0, per-task parameters, Deltas: node-local files
        state, deltas = chunked.scoring_inputs(config, context)
    else:
        state = records["arrays"].to_torch_state_dict()
        deltas = [lambda r=records[k]: r.to_torch_state_dict()
                  for k in ["delta", *(f"delta-{i}" for i in range(1, len(records)))] if k in records]
    if deltas:
        metrics.update(score_grid(config, task, deltas, CandidateModel(model_name, task, state, seed, device)))
    else:
        split = str(config.get("split", "test"))
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got '{split}'")
        model = model_for_task(model_name, task, state, seed, device)
        val = first_fraction(task.val, float(config.get(FRACTION_KEY, 0.0)))  # a prescreen's subset
        metrics["accuracy"], metrics["loss"] = evaluate(model, val if split == "val" else task.test)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
def coefficients(msg: Message, context: Context) -> Message:
    """The learned-coefficient phase (clients/coefficients.py): the coefficient gradient on
    half the validation split and the accuracy on the other half, K x B numbers back."""
    from .coefficients import answer

    config, pid = _receive(msg, context)
    task = task_for(config, pid)
    device = client_device(config.get("device"))
    seed = int(_pick(config, "seed", pid)) if "seed" in config else 0
    metrics = answer(msg.content, context.state, task,
                     lambda s: model_for_task(str(config["model"]), task, s, seed, device))
    return Message(RecordDict({"metrics": MetricRecord({**metrics, "partition-id": pid})}),
                   reply_to=msg)


@app.evaluate("ensemble")
def ensemble(msg: Message, context: Context) -> Message:
    """The prediction-ensemble phase (clients/ensemble.py): the mean softmax of the K members
    theta0 + tau_i on this client's val and test, and each member's scores."""
    from .ensemble import answer

    config, pid = _receive(msg, context)
    task = task_for(config, pid)
    device = client_device(config.get("device"))
    seed = int(_pick(config, "seed", pid)) if "seed" in config else 0
    metrics = answer(msg.content, task, lambda s: model_for_task(str(config["model"]), task, s, seed, device))
    return Message(RecordDict({"metrics": MetricRecord({**metrics, "partition-id": pid})}), reply_to=msg)


# Chunked messages (run-config chunk-mib; clients/chunked.py): groups of tensors in and out.
app.query(chunked.PUT)(chunked.put)
app.query(chunked.GET)(chunked.get)
app.query(chunked.DROP)(chunked.drop)
