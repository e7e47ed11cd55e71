"""Hydra configs derived from the code (ConfigStore): from `fl_merge.config.run_config.RunConfig` and
from the merge-method registry.

``<group>/_schema`` for the groups whose keys apply whatever option is chosen
(`GROUP_KEYS`: model, training, eval, runtime, attack): every key of the group, typed as
the RunConfig field of the same name, each null (unset: RunConfig's default applies).
Every ``configs/<group>/<option>.yaml`` of these groups starts from it
(``defaults: [_schema, _self_]``) and carries only what defines the option, so e.g.
``fl-merge attack=scale attack.attack_params={factor:10} attack.faults=crash@1`` or
``fl-merge eval=num_examples eval.test_all_etas=true`` works with any option, and a value of
the wrong type fails at composition. Per-client values and comma lists (`LIST_KEYS`) take a
Hydra list or a string: ``eval.etas=[0.5,1]``, ``training.local_steps=50..300``. (The data
group is not here on purpose: its options take different keys, ``data=tasks data.alpha=1``
is an error.)

``method/<name>`` for every registered method: ``name`` plus the parameters at their
signature defaults (`method_configs`); there are no configs/method/*.yaml.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from fl_merge.config.run_config import RunConfig

# Keys a group takes whatever its option; "name" selects the group's RunConfig field.
GROUP_KEYS = {
    # _target_: a user's model builder by import path (fl_merge/config/plugins.py), model.name its name
    "model": ("name", "_target_", "pretrain_steps", "pretrain_seed"),
    "training": ("local_steps", "lr", "batch_size", "fisher_samples", "gram_samples"),
    "eval": ("etas", "weighting", "test_all_etas"),
    "runtime": ("device", "cache", "output_dir", "round_timeout", "connect_timeout",
                "num_supernodes", "client_gpus"),
    "attack": ("name", "attackers", "attack_params", "faults", "fault_delay", "min_clients"),
}
# A list or a string (Flower's flat string is made by fl_merge.cli.mapping, parsed by
# RunConfig.resolve); attack_params also a mapping {factor: 10}.
LIST_KEYS = ("local_steps", "lr", "batch_size", "etas", "attack_params")
# CLI options (not RunConfig fields), checked by fl_merge.cli.mapping.build_job.
CLI_KEYS = ("num_supernodes", "client_gpus")
ATTACK_KEYS = GROUP_KEYS["attack"][1:]
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _field_type(name: str) -> Any:
    """RunConfig's type for `name`, optional (null = unset)."""
    kind = {f.name: f.type for f in dataclasses.fields(RunConfig)}[name]
    kind = kind if isinstance(kind, str) else kind.__name__
    return Optional[_TYPES[kind]]  # noqa: UP007 (OmegaConf reads typing.Optional)


def group_schema(group: str) -> type:
    """The structured config of `group` (see the module docstring)."""
    fields = []
    for key in GROUP_KEYS[group]:
        if key in ("name", "_target_"):
            kind: Any = Optional[str]  # noqa: UP007
        elif key in LIST_KEYS or key in CLI_KEYS:
            kind = Optional[Any]  # noqa: UP007 (CLI options: build_job names a bad value)
        else:
            kind = _field_type(key)
        fields.append((key, kind, None))
    return dataclasses.make_dataclass(f"{group.capitalize()}Schema", fields)


def attack_schema() -> type:
    return group_schema("attack")


def model_schema() -> type:
    return group_schema("model")


def method_configs() -> dict[str, dict[str, Any]]:
    """One Hydra config per registered merge method: ``name`` plus its parameters at the
    defaults of the method function's signature (`fl_merge.methods.get_method(name)
    .params`), the one place they are written. Flat, so overrides read
    ``fl-merge method=ties method.density=0.3``."""
    from fl_merge.methods import available_methods, get_method

    return {name: {"name": name, **get_method(name).params} for name in available_methods()}


def register() -> None:
    """Store the configs in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group in GROUP_KEYS:
        store.store(group=group, name="_schema", node=group_schema(group))
    for name, node in method_configs().items():  # method/<name>: no yaml repeats a default
        store.store(group="method", name=name, node=node)
