"""The Hydra config tree -> the Flower run config (`to_flower`) -> a validated `Job`.

Mapping onto the Flower run config (`to_flower`), then ``RunConfig.from_flower(...)``:

* a leaf ``<group>.<key>`` (or top-level ``<key>``) sets the run-config key ``<key>`` with
  dashes (``data.partition_task`` -> ``partition-task``); ``model.name``, ``data.name``,
  ``attack.name`` and ``method.name`` set ``model``, ``data``, ``attack`` and ``method``;
* ``null`` means unset: RunConfig's dataclass default applies (the single source of
  defaults; the yaml files only carry selections and the values that define a group);
* lists are joined with commas (``eval.etas=[0.5,1]`` -> ``etas="0.5,1"``);
* a task given as a mapping (``data.tasks``, ``data.partition_task``) is a task from data,
  written as its spec string (``{format: csv, path: /abs/bbc.csv, input: text, label:
  category}`` -> ``csv:/abs/bbc.csv?input=text&label=category``, docs/data.md);
* ``method.<param>`` values that differ from the registry default go to
  ``method-params`` as ``<method>.<param>=<value>`` for every listed method taking the
  parameter (one equal to the default is not passed: it is the default);
* ``runtime.num_supernodes`` and ``runtime.client_gpus`` are for the CLI only;
* ``_target_`` in the method or model group, or a ``{_target_, name}`` entry of
  ``data.tasks``, names a user's own function by import path: it becomes a ``plugins`` item
  (fl_merge/config/plugins.py `from_hydra`), registered here at once and in every process of the run.

`plan` composes and validates every job of a command line before anything trains.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_merge.cli import schema
from fl_merge.core.values import did_you_mean, split_list
from fl_merge.config.parsing import check_client_gpus
from fl_merge.config.run_config import ConfigError, ResolvedConfig, RunConfig
from fl_merge.config.base_fit import check_fits_base, theta0_layout
from fl_merge.io.output_paths import unwritable_reason

# The copy inside the package in a wheel install; ./configs in a checkout or editable install.
_PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else ROOT / "configs"
CONFIG_NAME = "config"
# A group's `name` key sets this run-config field.
GROUP_FIELDS = {"model": "model", "data": "data", "method": "method", "attack": "attack"}
# Keys for the CLI itself, not the run config.
CLI_OPTIONS = {"runtime.num_supernodes": "num_supernodes", "runtime.client_gpus": "client_gpus"}
# The config tree's structured parts (attack/_schema) must be in Hydra's ConfigStore before
# anything composes it: here, since every composition goes through this module.
schema.register()


# --------------------------------------------------------------------------- mapping

def run_config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RunConfig)}


# Flower run-config strings of `key=value` items that Hydra may give as a mapping:
# attack.attack_params={factor:10} -> attack-params="factor=10"; lines={beta:[0.1,0.5]} -> "beta=0.1,0.5".
MAPPING_KEYS = ("attack_params", "lines")
# Keys naming tasks, where a mapping is a task from data ({format: csv, path: ..., input: ...}
# -> 'csv:/...?input=...', fl_merge.tasks.specs.format_task_spec; docs/data.md).
TASK_KEYS = ("tasks", "partition_task")


def _scalar(path: str, value: Any) -> Any:
    """A Hydra value as a Flower run-config value: lists joined with commas, a mapping
    (only where MAPPING_KEYS allows) as space-separated key=value items."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(_scalar(path, v)) for v in value)
    if isinstance(value, dict):
        if path.rsplit(".", 1)[-1] in TASK_KEYS:  # a task from data in its structured form
            from fl_merge.tasks.specs import DataTaskError, format_task_spec

            try:
                return format_task_spec(value)
            except DataTaskError as e:
                raise ConfigError(f"'{path}': {e}") from None
        if path.rsplit(".", 1)[-1] not in MAPPING_KEYS:
            raise ConfigError(f"'{path}' is a mapping; give a value")
        return " ".join(f"{k}={_scalar(f'{path}.{k}', v)}" for k, v in value.items())
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal values (1 == 1.0), but a bool only equals a bool."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _method_settings(node: Mapping[str, Any]) -> dict[str, Any]:
    """The method group -> {"method": ..., "method-params": ...} (see the module docstring)."""
    from fl_merge.methods import available_methods, get_method
    from fl_merge.core.task_vectors import MergeInputError

    raw = node.get("name")
    names = [str(n) for n in raw] if isinstance(raw, (list, tuple)) else split_list(raw or "")
    if not names:
        raise ConfigError("method.name is empty: name at least one merge method")
    try:
        registry = {n: get_method(n) for n in names}
    except MergeInputError as e:
        raise ConfigError(str(e)) from None
    params: list[str] = []
    for pname, value in node.items():
        if pname == "name":
            continue
        takers = [n for n in names if pname in registry[n].params]
        if not takers:
            defaults = [get_method(m).params[pname] for m in available_methods()
                        if pname in get_method(m).params]
            if any(_same(value, d) for d in defaults):
                continue  # a group file's default, for a method not listed: nothing to pass
            raise ConfigError(f"method.{pname}={value}: none of the methods {names} takes "
                              f"'{pname}'")
        for n in takers:
            default = registry[n].params[pname]
            if _same(value, default):
                continue
            if isinstance(value, (list, tuple, dict)) or " " in str(value) or "," in str(value):
                raise ConfigError(f"method.{pname}: '{value}' is not a single value")
            params.append(f"{n}.{pname}={value}")
    out: dict[str, Any] = {"method": ",".join(names)}
    if params:
        out["method-params"] = " ".join(params)
    return out


def to_flower(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A composed Hydra config -> (Flower run-config dict with dashed keys holding only the
    values set, CLI options). Raises ConfigError for a key that is no setting."""
    from omegaconf import DictConfig, OmegaConf

    from fl_merge.config.plugins import PluginError, from_hydra, load_plugins

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    try:
        data, items = from_hydra(data)
        listed = data.get("plugins") or []
        items = [*(listed.replace(",", " ").split() if isinstance(listed, str) else listed), *items]
        load_plugins(items)  # the method group below looks the plugin methods up
    except PluginError as e:
        raise ConfigError(str(e)) from None
    if items:
        data["plugins"] = items
    fields = run_config_fields()
    flower: dict[str, Any] = {}
    options: dict[str, Any] = {}

    def put(path: str, name: str, value: Any) -> None:
        if name not in fields:
            raise ConfigError(f"'{path}' is not a fl-merge setting (RunConfig has no field "
                              f"'{name}'){did_you_mean(name, sorted(fields))}")
        if value is not None:
            flower[name.replace("_", "-")] = _scalar(path, value)

    for key, value in data.items():
        if key == "hydra":
            continue
        if key == "method" and isinstance(value, dict):
            flower.update(_method_settings(value))
        elif isinstance(value, dict) and key not in MAPPING_KEYS:  # a group (lines={...} is a value)
            for sub, v in value.items():
                path = f"{key}.{sub}"
                if path in CLI_OPTIONS:
                    if v is not None:
                        options[CLI_OPTIONS[path]] = v
                elif sub == "name":
                    if key not in GROUP_FIELDS:
                        raise ConfigError(f"'{path}': group '{key}' has no name setting")
                    put(path, GROUP_FIELDS[key], v)
                else:
                    put(path, sub, v)
        else:
            put(key, key, value)
    return flower, options


@dataclasses.dataclass
class Job:
    overrides: list[str]
    flower: dict[str, Any]
    run: RunConfig
    num_supernodes: int
    client_gpus: float = 0.0
    resolved: ResolvedConfig | None = None  # `run` validated (build_job resolves it once)

    @property
    def label(self) -> str:
        return " ".join(self.overrides) or "(defaults)"


def build_job(cfg: Any, overrides: Sequence[str] = ()) -> Job:
    """Map, build RunConfig (unset values: its defaults) and validate; raises ConfigError."""
    flower, options = to_flower(cfg)
    run = RunConfig.from_flower(flower)
    resolved = run.resolve()
    supernodes = options.get("num_supernodes") or run.num_clients
    if isinstance(supernodes, bool) or not isinstance(supernodes, int) or supernodes < run.num_clients:
        raise ConfigError(f"runtime.num_supernodes={supernodes} must be an integer of at least "
                          f"num_clients={run.num_clients}")
    gpus = check_client_gpus(options.get("client_gpus", 0.0), "runtime.client_gpus")
    if run.output_dir and (why := unwritable_reason(run.output_dir)) is not None:
        raise ConfigError(f"runtime.output_dir={run.output_dir} cannot be written: {why}")
    return Job(list(overrides), flower, run, supernodes, gpus, resolved)


def _is_hydra_override(item: str) -> bool:
    key = item.lstrip("+~").split("=", 1)[0]
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _error_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _compose_error(e: BaseException) -> str:
    """Hydra's multi-line composition errors as one line: no search path, the options of a
    missing group choice comma-separated, the cause of a failed override (unknown key)."""
    text = str(e).split("Config search path:")[0].split("\nSee https://hydra.cc")[0]
    head, _, options = text.partition("Available options in")
    line = _error_line(Exception(head)).rstrip(".; ")
    if options:
        group, _, names = options.partition(":")
        line += f"; available options in {group.strip()}: {', '.join(names.split())}"
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        line += f" ({str(cause).strip().splitlines()[0]})"
    return line


def config_paths(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a composed config (plain containers), groups included: 'model',
    'model.name', ..., 'seed'; Hydra's own keys left out."""
    out = []
    for key, value in node.items():
        if key == "hydra" or str(key).startswith("_"):
            continue
        out.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            out += config_paths(value, f"{prefix}{key}.")
    return out


def key_hint(key: str, paths: Sequence[str]) -> str:
    """' (did you mean X?)' for a key the config lacks: the key of the same name in another
    group ('lr' -> 'training.lr'), else the closest path a letter or two off ('lamdas' ->
    'lambdas'); '' when none is close."""
    leaf = key.rsplit(".", 1)[-1]
    same = [p for p in paths if p != key and p.rsplit(".", 1)[-1] == leaf]
    return f" (did you mean '{same[0]}'?)" if same else did_you_mean(key, paths)


def _missing_key(e: BaseException) -> str | None:
    """The key of an override Hydra refused because the config has no such key, else None."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    found = re.match(r"Could not override '([^']+)'", str(e))
    missing = isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError))
    return found.group(1) if found and missing else None


def composition_error(e: BaseException, overrides: Sequence[str]) -> str:
    """`_compose_error`'s line, but for an override of a key that does not exist: that it
    does not, and the key meant (`key_hint` over the config composed without it) instead of
    Hydra's advice to add it with '+' (fl-merge would refuse it then). Call it inside
    Hydra's initialize_config_dir, as `plan` does."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key = _missing_key(e)
    if key is None:
        return _compose_error(e)
    rest = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key]
    try:
        paths = config_paths(OmegaConf.to_container(compose(CONFIG_NAME, overrides=rest)))
    except (HydraException, OmegaConfBaseException):
        paths = []
    return (f"Could not override '{key}': the composed config has no such key{key_hint(key, paths)}; "
            "`fl-merge [GROUP=OPTION ...] --help` lists its keys")


def expand(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """The jobs of a command line, expanded by Hydra's own BasicSweeper (the sweeper
    `fl-merge -m` runs; cartesian product in the order given). A sweep without -m is a
    ConfigError."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        for o in parsed:
            if o.is_sweep_override() and not multirun:
                raise ConfigError(f"'{o.input_line}' is a sweep: add -m (--multirun) to run one job per value")
        (batch,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException as e:  # OverrideParseException, a sweep type BasicSweeper lacks
        raise ConfigError(_compose_error(e)) from None
    return batch


def plan(overrides: Sequence[str], multirun: bool) -> list[Job]:
    """Compose and validate every job before anything runs, against its base model too
    (`fl_merge.config.base_fit`: merge-keys, client checkpoints; the base is pretrained here
    when not cached); raises ConfigError naming the job (in a sweep) and what is wrong, in
    one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    mine = [o for o in overrides if not _is_hydra_override(o)]
    jobs: list[Job] = []
    layouts: dict[tuple, dict | None] = {}  # theta0's names and shapes, once per base of the command
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3", job_name="fl-merge"):
        for job_overrides in expand(mine, multirun):
            where = f"job [{' '.join(job_overrides)}]: " if multirun else ""
            try:
                cfg = compose(CONFIG_NAME, overrides=job_overrides)
            except (HydraException, OmegaConfBaseException) as e:  # composition errors
                raise ConfigError(where + composition_error(e, job_overrides)) from None
            try:
                job = build_job(cfg, job_overrides)
                run = job.run  # merge-keys and client checkpoints against theta0, before any job runs
                base = (run.base_checkpoint, run.model, run.pretrain_steps, run.pretrain_seed, run.plugins)
                if base not in layouts:
                    layouts[base] = theta0_layout(job.resolved)
                if layouts[base] is not None:  # None: a hub model, checked when the run loads it
                    check_fits_base(job.resolved, layouts[base])
            except ConfigError as e:
                raise ConfigError(where + str(e)) from None
            if multirun and job.run.output_dir:
                raise ConfigError("runtime.output_dir cannot be set in a multirun: every job "
                                  "writes its own Hydra job dir (set hydra.sweep.dir instead)")
            jobs.append(job)
    return jobs


