"""Hydra configs derived from the code (ConfigStore): from `fl_merge.config.RunConfig` and
from the merge-method registry.

``method/<name>`` for every registered method: ``name`` plus the parameters at their
signature defaults (`method_configs`); there are no configs/method/*.yaml.

``model/_schema``: every model option takes name, pretrain_steps, pretrain_seed,
merge_keys (fnmatch patterns of merged parameter names) and base_checkpoint (theta0 from a
file), typed as in RunConfig, null = RunConfig's default.

``attack/_schema`` holds every attack and fault key (`ATTACK_KEYS`), typed as the RunConfig
field of the same name, each null (unset: RunConfig's default applies); every
``configs/attack/<name>.yaml`` starts from it (``defaults: [_schema, _self_]``), so
``fl-merge attack=scale attack.attack_params={factor:10} attack.faults=crash@1`` works
with any attack, and a value of the wrong type fails at composition.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from fl_merge.config import RunConfig

ATTACK_KEYS = ("attackers", "attack_params", "faults", "fault_delay", "min_clients")
# Keys every model/<name>.yaml takes (model/_schema), beside the option's own.
MODEL_KEYS = ("merge_keys", "base_checkpoint")
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _field_type(name: str) -> Any:
    """RunConfig's type for `name`, optional (null = unset)."""
    kind = {f.name: f.type for f in dataclasses.fields(RunConfig)}[name]
    kind = kind if isinstance(kind, str) else kind.__name__
    return Optional[_TYPES[kind]]  # noqa: UP007 (OmegaConf reads typing.Optional)


def attack_schema() -> type:
    fields = [("name", Optional[str], None)]  # noqa: UP007
    # attack_params: a "factor=10" string or a mapping {factor: 10} (fl_merge.cli.mapping).
    fields += [(k, Optional[Any] if k == "attack_params" else _field_type(k), None)  # noqa: UP007
               for k in ATTACK_KEYS]
    return dataclasses.make_dataclass("AttackSchema", fields)


def model_schema() -> type:
    """name, pretrain_steps, pretrain_seed and MODEL_KEYS, typed from RunConfig."""
    fields = [("name", Optional[str], None)]  # noqa: UP007
    fields += [(k, _field_type(k), None) for k in ("pretrain_steps", "pretrain_seed", *MODEL_KEYS)]
    return dataclasses.make_dataclass("ModelSchema", fields)


def method_configs() -> dict[str, dict[str, Any]]:
    """One Hydra config per registered merge method: ``name`` plus its parameters at the
    defaults of the method function's signature (`fl_merge.aggregation.get_method(name)
    .params`), the one place they are written. Flat, so overrides read
    ``fl-merge method=ties method.density=0.3``."""
    from fl_merge.aggregation import available_methods, get_method

    return {name: {"name": name, **get_method(name).params} for name in available_methods()}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="attack", name="_schema", node=attack_schema())
    store.store(group="model", name="_schema", node=model_schema())
    for name, node in method_configs().items():  # method/<name>: no yaml repeats a default
        store.store(group="method", name=name, node=node)

