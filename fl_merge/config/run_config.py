"""Typed run configuration, shared by the ServerApp, the launcher and tests.

The Flower run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden with
``--run-config 'k=v'``) uses dashed keys; `RunConfig` is the same set with underscores.
Its defaults are the single source: a test checks pyproject.toml carries the same values.
Everything is validated by `RunConfig.resolve()` before any training starts.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fl_merge.models.device import DEFAULT_DEVICE, DEVICES
from fl_merge.core.seeds import check_scheme, client_seeds
from fl_merge.core.values import split_list
from fl_merge.round.attacks import AttackPlan
from fl_merge.round.chunks import chunk_limit
from fl_merge.round.settings import RoundSettings
from fl_merge.config.parsing import (  # noqa: F401  (ConfigError, parse_method_params: public here too)
    DEFAULT_ETAS,
    INT64_MAX,
    ConfigError,
    _coerce,
    _number,
    _per_client,
    check_client_gpus,
    parse_method_params,
    resolve_methods, unknown_key,
)

PARTITION_SCHEMES = ("iid", "dirichlet", "pathological", "shared")


@dataclass(frozen=True)
class RunConfig:
    num_clients: int = 4
    data: str = "tasks"  # tasks: one task per client | iid | dirichlet | pathological split | shared
    suite: str = "mnist8"
    tasks: str = ""  # comma list of task names; empty: the first num-clients of the suite
    partition_task: str = "rotate90"  # the one task split across clients (data != tasks)
    alpha: float = 0.5  # Dirichlet concentration (data=dirichlet): small = skewed labels
    classes_per_client: int = 2  # data=pathological
    partition_pool: int = 8000  # training examples split across the clients
    partition_probe: str = "heldout"  # the head's data (data != tasks): heldout | val (runs before Dec 2026)
    model: str = "mnist-cnn"
    # Parameters merged: fnmatch patterns of their names (comma list); the rest are per-task.
    merge_keys: str = "backbone.*"
    # theta0 from a .safetensors file or a directory holding model.safetensors instead of
    # the model registry (model then only tells fl-merge's own clients what to build).
    base_checkpoint: str = ""
    # Checkpoint clients (docs/checkpoints.md): a comma list of num-clients paths, entry i
    # client i's fine-tuned checkpoint (empty entry: it trains); node-config checkpoint wins.
    client_checkpoints: str = ""
    # Their local steps (FedNova): one value or one per client; empty: checkpoint metadata.
    checkpoint_steps: str = ""
    pretrain_steps: int = 40
    pretrain_seed: int = 0
    method: str = "task_arithmetic"  # one method, or a comma list scored on the same updates
    method_params: str = ""  # "name=value ..." (every listed method taking it) or "ties.density=0.2"
    # Validation search (fl_merge/merging/search.py): paper = each method's own space (its
    # knobs x its lambda grid in its own units); off = fixed params, one shared eta grid.
    search: str = "paper"
    lambdas: str = ""  # lambda grid, each method's paper units; empty: search.LAMBDAS (0.05..2)
    lines: str = ""  # LiNeS per-layer lambda (docs/methods.md): off | paper | "alpha=A beta=B1|B2 pattern=RE"
    # One eta grid shared by every method (0, the base, is added); empty: the lambdas, or
    # DEFAULT_ETAS with search=off. Given with search=paper, the knobs are still searched.
    etas: str = ""
    # Learned coefficients after the choice (fl_merge/round/coefficients.py): off | task |
    # block; coefficient-only rounds, Adam's step size, supervised (aTLAS) | entropy (AdaMerging).
    learn_coefficients: str = "off"
    coef_rounds: int = 5
    coef_lr: float = 0.05
    coef_objective: str = "supervised"
    greedy_soup: bool = False  # also the greedy soup of the clients' models (fl_merge/merging/soups.py)
    # Two-stage validation scoring (fl_merge/round/prescreen.py): every candidate on this
    # fraction of each validation split, then each method's `finalists` best on all of it.
    prescreen: float = 0.0  # 0: off (every candidate on the whole validation split)
    finalists: int = 3
    # Also the ensemble of the clients' models' predictions and the best single model (chosen
    # on validation): reference rows (fl_merge/round/ensemble.py; DiWA's comparison).
    ensemble: bool = False
    weighting: str = "uniform"  # uniform | num-examples
    # Score the test split at every eta too (else only at the base and each method's eta
    # chosen on validation: the selection protocol, at a fraction of the evaluation cost).
    test_all_etas: bool = False
    # Per-client training values: one for all, a comma list of num-clients values, or a
    # seeded spread "lo..hi" (steps uniform, lr log-uniform): training heterogeneity.
    local_steps: str = "150"
    lr: str = "0.01"
    batch_size: str = "64"
    seed: int = 0  # root of the clients' training seeds (fl_merge/core/seeds.py)
    client_seeds: str = "spawn"  # spawn: independent streams per client and replicate | offset: seed + i
    data_seed: int = 0
    fisher_samples: int = 256  # examples per client for the diagonal Fisher (method=fisher)
    gram_samples: int = 1000  # examples per client for the Gram matrices (method=regmean)
    device: str = DEFAULT_DEVICE  # where the server aggregates and clients train: auto | cpu | cuda
    cache: bool = True  # reuse identical client updates from the client-update cache
    # Server memory for large models (fl_merge/io/spill.py): each train reply written to a spill
    # file under output-dir as it arrives, task vectors too, read back memory-mapped; removed
    # when the round ends. Same results; docs/deployment.md "Memory".
    spill: bool = False
    # > 0: every message to and from fl-merge's own clients carries at most this many MiB of
    # tensors (theta0, updates and Deltas cut into groups; fl_merge/round/chunks.py); implies
    # spill. 0: whole-model messages. docs/protocol.md "Chunked messages".
    chunk_mib: float = 0.0
    # Above this size the merged model files are Hugging Face shards + index (5GB, 500MB, 2GiB).
    max_shard_size: str = "5GB"
    # Heterogeneity measures in results (fl_merge/stats/heterogeneity.py): clients also send their gradient
    # at theta0, which doubles every train reply; false for large models through deployment.
    measure_heterogeneity: bool = True
    output_dir: str = ""  # empty: ./outputs/<time>-<method>
    round_timeout: float = 1800.0
    connect_timeout: float = 120.0
    # Fewest clients that must deliver a usable update for the merge to go on (failed ones
    # are named and left out); 0: every method's own minimum (e.g. krum's 2f+3).
    min_clients: int = 0
    # Byzantine clients and injected faults (fl_merge/round/attacks.py). attackers: partition ids
    # "6,7" or "last:2"; attack-params e.g. "factor=10"; faults e.g. "crash@1,nan@2".
    attack: str = ""  # sign_flip | scale | gaussian | random | label_flip | alie (empty: none)
    attackers: str = ""
    attack_params: str = ""
    faults: str = ""  # <crash|nan|malformed|timeout>@<partition id>, comma separated
    fault_delay: float = 0.0  # seconds a timeout@ client waits before replying
    # A user's own merge methods, tasks and models by import path (fl_merge/config/plugins.py):
    # "method:<name>=<module>.<fn> task:<name>=... model:<name>=... <module>"; every process
    # of the run registers them (here in resolve(), clients from the task config).
    plugins: str = ""

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from a Flower run config (dashed keys); unknown keys are an error."""
        if not isinstance(run_config, Mapping):
            raise ConfigError(
                f"run config must be a mapping of run-config keys to values, "
                f"got {type(run_config).__name__}"
            )
        names = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            if not isinstance(key, str):
                raise ConfigError(f"run-config key {key!r} is not a string; known: {', '.join(flower_keys())}")
            name = key.replace("-", "_")
            if name not in names:
                raise unknown_key(key, flower_keys())
            kwargs[name] = _coerce(key, value, names[name].type)
        return cls(**kwargs)

    def to_flower(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def resolve(self, own_clients: bool = False) -> ResolvedConfig:
        """Validate every field and expand per-client lists; raises ConfigError. `own_clients`:
        the app's ClientApp is not fl-merge's, so task names and model are the user's labels
        (fl_merge.config.task_names)."""
        from fl_merge.config.task_names import check_model, resolve_task_names
        from fl_merge.core.task_vectors import MergeInputError

        from fl_merge.config.plugins import PluginError, load_plugins

        try:
            load_plugins(self.plugins)  # first: the names below may be the plugins' own
        except PluginError as e:
            raise ConfigError(str(e)) from None
        k = self.num_clients
        if k < 1:
            raise ConfigError(f"num-clients must be at least 1, got {k}")
        if self.data not in ("tasks", *PARTITION_SCHEMES):
            raise ConfigError(f"data must be tasks, {', '.join(PARTITION_SCHEMES)}; got '{self.data}'")
        tasks = resolve_task_names(self, own_clients)
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha}")
        if not 1 <= self.classes_per_client:
            raise ConfigError(f"classes-per-client must be at least 1, got {self.classes_per_client}")
        if self.partition_pool < 10 * k:
            raise ConfigError(f"partition-pool={self.partition_pool} is too small for {k} clients")
        check_model(self, tasks, own_clients)
        try:
            methods = resolve_methods(self.method, self.method_params, k, self.search)
        except MergeInputError as e:
            raise ConfigError(str(e)) from None
        from fl_merge.round.base import CheckpointError, check_base_checkpoint
        from fl_merge.round.keys import MergeKeysError, parse_merge_keys

        try:
            merge_keys = parse_merge_keys(self.merge_keys)
            if self.base_checkpoint:
                check_base_checkpoint(self.base_checkpoint)
        except (MergeKeysError, CheckpointError) as e:
            raise ConfigError(str(e)) from None
        etas = sorted({0.0, *(_number("etas", v, float) for v in split_list(self.etas or DEFAULT_ETAS))})
        if any(e < 0 for e in etas) or len(etas) < 2:
            raise ConfigError(f"etas must be non-negative with at least one above 0, got '{self.etas}'")
        from fl_merge.round.candidates import resolve_lambdas

        try:
            lambdas = resolve_lambdas(self.search, self.lambdas, self.etas, methods, self.lines)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from fl_merge.round.coefficients import check_settings

        try:
            check_settings(self.learn_coefficients, self.coef_objective, self.coef_rounds,
                           self.coef_lr, "adam", [name for name, _ in methods])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from fl_merge.round.prescreen import check_prescreen
        from fl_merge.round.candidates import check_weighting

        try:
            check_prescreen(self.prescreen, self.finalists, self.test_all_etas)
            check_weighting(self.weighting, [name for name, _ in methods])  # EMR: uniform only
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.device not in DEVICES:
            raise ConfigError(f"device must be auto, cpu or cuda, got '{self.device}'")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("device=cuda but torch sees no CUDA GPU on this machine "
                                  f"(torch {torch.__version__}): use device=auto or device=cpu")
        for key in ("fisher-samples", "gram-samples", "pretrain-steps"):
            if getattr(self, key.replace("-", "_")) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key.replace('-', '_'))}")
        if not 0 <= self.chunk_mib < float("inf"):
            raise ConfigError(f"chunk-mib must be 0 (off) or a positive number of MiB, got {self.chunk_mib}")
        if self.chunk_mib and (self.learn_coefficients != "off" or self.ensemble):
            raise ConfigError("chunk-mib does not cover learn-coefficients or ensemble yet (their messages "
                              "hold whole models): set chunk-mib=0 or turn them off")
        from fl_merge.io.checkpoints import parse_size

        try:
            parse_size(self.max_shard_size)
        except ValueError as e:
            raise ConfigError(str(e).replace("max shard size", "max-shard-size")) from None
        if not 0 <= self.min_clients <= k:
            raise ConfigError(f"min-clients must be in 0..num-clients={k}, got {self.min_clients}")
        for key in ("round-timeout", "connect-timeout"):
            value = getattr(self, key.replace("-", "_"))
            if not value > 0:
                raise ConfigError(f"{key} must be a positive number of seconds, got {value}")
        from fl_merge.tasks.partitions import check_probe

        try:
            check_scheme(self.client_seeds)
            check_probe(self.partition_probe)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for key in ("seed", "data-seed", "pretrain-seed"):
            value = getattr(self, key.replace("-", "_"))
            # offset: client i trains with seed + i, and every client's seed must fit 64 bits
            top = INT64_MAX - (k - 1 if key == "seed" and self.client_seeds == "offset" else 0)
            if not 0 <= value <= top:
                raise ConfigError(f"{key} must be in 0..{top}, got {value}")
        from fl_merge.round.attacks import AttackConfigError, parse_plan

        try:
            plan = parse_plan(self.attack, self.attackers, self.attack_params, self.faults, k,
                              self.fault_delay)
        except AttackConfigError as e:
            raise ConfigError(str(e)) from None
        from fl_merge.io.client_checkpoints import (
            CheckpointClientError,
            parse_checkpoint_steps,
            parse_client_checkpoints,
        )
        from fl_merge.io.checkpoints import Checkpoint

        try:
            checkpoints = parse_client_checkpoints(self.client_checkpoints, k)
            checkpoint_steps = parse_checkpoint_steps(self.checkpoint_steps, k)
            for i, path in enumerate(checkpoints):  # format only: names need theta0 (server)
                if path:
                    Checkpoint(path, f"client-checkpoints entry {i}", pickles=True).close()
        except (CheckpointClientError, MergeInputError) as e:
            raise ConfigError(str(e)) from None
        steps = _per_client("local-steps", self.local_steps, k, int, self.seed)
        lrs = _per_client("lr", self.lr, k, float, self.seed)
        batches = _per_client("batch-size", self.batch_size, k, int, self.seed)
        return ResolvedConfig(
            run=self,
            tasks=tasks,
            methods=methods,
            etas=etas,
            local_steps=steps,
            lrs=lrs,
            batch_sizes=batches,
            seeds=client_seeds(self.seed, k, self.client_seeds),
            attack_plan=plan,
            merge_keys=merge_keys,
            lambdas=lambdas,
            client_checkpoints=checkpoints,
            checkpoint_steps=checkpoint_steps,
            own_clients=own_clients,
        )


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated RunConfig with per-client values expanded (index = partition id)."""

    run: RunConfig
    tasks: list[str]
    methods: list[tuple[str, dict[str, Any]]]  # (method name, its parameters), primary first
    etas: list[float]
    local_steps: list[int]
    lrs: list[float]
    batch_sizes: list[int]
    seeds: list[int]
    extra: dict[str, Any] = field(default_factory=dict)
    attack_plan: AttackPlan = field(default_factory=lambda: AttackPlan())
    merge_keys: tuple[str, ...] = ("backbone.*",)  # merge-keys, parsed
    lambdas: list[float] | None = None  # the lambda grid; None: the shared etas
    client_checkpoints: list[str] = field(default_factory=list)  # absolute paths, '' = trains
    checkpoint_steps: list[int] = field(default_factory=list)  # 0 = not given
    own_clients: bool = False  # the app's own ClientApp (resolve's own_clients)
    app_config: dict[str, Any] = field(default_factory=dict)  # an app's own (not fl-merge's) keys

    def task_config(self) -> dict[str, Any]:
        """What a client needs to build its data and model (train and evaluate messages)."""
        run = self.run
        return {
            "model": run.model, "tasks": list(self.tasks), "data-seed": run.data_seed,
            "data": run.data, "partition-task": run.partition_task, "alpha": run.alpha,
            "classes-per-client": run.classes_per_client, "partition-pool": run.partition_pool,
            "partition-probe": run.partition_probe,
            "device": run.device,  # where clients train and score too (not part of a cache key)
            "plugins": run.plugins,  # each client registers them before building its task and model
        }

    def train_config(self) -> dict[str, Any]:
        """The training config every client receives: task config plus per-client lists,
        indexed by the client's partition id (scalars when all clients agree)."""

        def compact(values: list) -> Any:
            return values[0] if len(set(values)) == 1 else list(values)

        return {
            **self.task_config(),
            "local-steps": compact(self.local_steps),
            "lr": compact(self.lrs),
            "batch-size": compact(self.batch_sizes),
            "seed": list(self.seeds),
            "fisher-samples": self.run.fisher_samples, "gram-samples": self.run.gram_samples,
            "cache": self.run.cache,
            # Attacks and faults: clients parse these with fl_merge.round.attacks.parse_plan.
            "attack": self.run.attack, "attackers": self.run.attackers,
            "attack-params": self.run.attack_params, "faults": self.run.faults,
            "fault-delay": self.run.fault_delay,
            # Checkpoint clients (fl_merge/io/client_checkpoints.py); absent when there are none.
            **({"client-checkpoints": list(self.client_checkpoints),
                "checkpoint-steps": list(self.checkpoint_steps)} if any(self.client_checkpoints) else {}),
        }

    def round_settings(self, out: Path) -> RoundSettings:
        """The merge round's typed settings (fl_merge.round.settings), built from this config
        once, not checked again; `out`: the run's output folder (spill files go there)."""
        run = self.run
        return RoundSettings.build(
            methods=self.methods, etas=self.etas, test_all_etas=run.test_all_etas, search=run.search,
            lambdas=self.lambdas, learn_coefficients=run.learn_coefficients,
            coef_objective=run.coef_objective, coef_rounds=run.coef_rounds, coef_lr=run.coef_lr,
            greedy_soup=run.greedy_soup, ensemble=run.ensemble, prescreen=run.prescreen, lines=run.lines,
            finalists=run.finalists, spill_dir=str(out) if run.spill or run.chunk_mib else None,
            chunk_bytes=chunk_limit(run.chunk_mib),
            measure_heterogeneity=run.measure_heterogeneity, min_clients=run.min_clients,
            attack_plan=self.attack_plan, merge_keys=self.merge_keys, weighting=run.weighting,
            device=run.device, task_names=self.tasks, checked=True)  # resolve() checked them

    @property
    def method_params(self) -> dict[str, Any]:
        """The primary (first) method's parameters."""
        return self.methods[0][1]

    def with_output_dir(self, path: str | Path) -> ResolvedConfig:
        """The same resolved config writing to `path` (the output dir is not validated)."""
        return dataclasses.replace(self, run=dataclasses.replace(self.run, output_dir=str(path)))

    def output_dir(self) -> Path:
        if self.run.output_dir:
            return Path(self.run.output_dir).expanduser().resolve()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = "-".join(m for m, _ in self.methods)[:60]
        return (Path.cwd() / "outputs" / f"{stamp}-{name}").resolve()

    def as_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)


def flower_keys() -> list[str]:
    return [f.name.replace("_", "-") for f in fields(RunConfig)]


