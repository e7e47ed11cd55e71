"""What the commands say about themselves: the installed version (`--version` of every
command) and `fl-merge --help`, a page of fl-merge's own.

Hydra's generic page shows every key as null (null means "unset: RunConfig's default
applies", fl_merge/cli/mapping.py), lists the internal ``_schema`` options and knows nothing
of ``fl-merge report`` and ``fl-merge merge``. This page shows the subcommands, every config
group's options and every key with the default a run really uses (`run_default`); Hydra's
own help stays one flag away (``fl-merge --hydra-help``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from fl_merge.cli.mapping import (CONFIG_DIR, CONFIG_NAME, GROUP_FIELDS, MAPPING_KEYS, _is_hydra_override,
                                  composition_error, expand)
from fl_merge.config.run_config import ConfigError, RunConfig

DISTRIBUTION = "fl-merge"
WIDTH = 100
# Keys whose default is set by the `fl-merge` command, not by RunConfig.
COMMAND_DEFAULTS = {"runtime.output_dir": "<the Hydra job dir>",
                    "runtime.num_supernodes": "<num_clients>", "runtime.client_gpus": 0}
GROUPS = ("model", "data", "training", "method", "eval", "runtime", "attack", "experiment")


def package_version() -> str:
    """The installed distribution's version (importlib.metadata): the one in pyproject.toml."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # imported from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


def version_line(prog: str) -> str:
    """What `--version` prints, e.g. 'fl-merge-run 0.1.0'."""
    return f"{prog} {package_version()}"


def run_default(path: str, value: Any) -> Any:
    """The value a run uses for the composed key `path` ('model.name', 'seed'): the value
    set in the config tree, else (null) the command's own default for its CLI keys, else
    RunConfig's default for the field the key maps onto (fl_merge/cli/mapping.py)."""
    if value is not None:
        return value
    if path in COMMAND_DEFAULTS:
        return COMMAND_DEFAULTS[path]
    group, _, key = path.rpartition(".")
    field = GROUP_FIELDS[group] if key == "name" and group in GROUP_FIELDS else key
    return getattr(RunConfig(), field, None)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(v) for v in value) + "]"
    if value == "":
        return '""'
    return str(value)


def key_defaults(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """A composed config (plain containers) -> group ('' for the top level) -> ['key=default', ...]
    with `run_default`'s values; keys starting with '_' (a plugin's _target_) are left out."""
    out: dict[str, list[str]] = {}
    for name, node in cfg.items():
        if name == "hydra" or name.startswith("_"):
            continue
        if isinstance(node, Mapping) and name not in MAPPING_KEYS:  # a group
            out[name] = [f"{key}={_text(run_default(f'{name}.{key}', v))}" for key, v in node.items()
                         if not key.startswith("_")]
        else:
            out.setdefault("", []).append(f"{name}={_text(run_default(name, node))}")
    return out


def _rows(label: str, items: Sequence[str]) -> list[str]:
    return textwrap.wrap("  ".join(items), WIDTH, initial_indent=f"  {label:<11}",
                         subsequent_indent=" " * 13, break_on_hyphens=False) or [f"  {label}"]


USAGE = """\
usage: fl-merge [GROUP=OPTION] [KEY=VALUE ...]     one run (Flower's simulation engine)
       fl-merge -m KEY=A,B [KEY=C,D ...]          a sweep: one job per combination
       fl-merge report DIR                        best setting per method (chosen on validation), plots
       fl-merge merge --base B --models M1 M2 ... --method NAME --lambda L --out OUT
                                                  merge checkpoint files, without Flower
       fl-merge (-h | --help | --version | --hydra-help)

Model merging as one-shot federated learning, on Flower: K clients fine-tune the base model,
the server merges their task vectors once, chooses eta on validation and scores test.
Every job is checked before anything trains (a bad key: one line, exit 2).

subcommands:
  report      fl-merge report --help
  merge       fl-merge merge --help
  (fl-merge-run --run-config 'KEY=VALUE ...' is the same run through `flwr run`; its --help)
"""

EPILOG = """\
examples:
  fl-merge method=ties method.density=0.3
  fl-merge method.name=[fedavg,ties,median] eval.etas=[0.5,1,2]   # 3 methods, one training pass
  fl-merge -m method=fedavg,ties data=dirichlet data.alpha=0.1,1.0 seed=0,1
  fl-merge +experiment=headroom                                   # a preset
  fl-merge report multirun/<date>/<time>

options:
  -h, --help       this page (with overrides: the defaults after them, e.g. fl-merge data=dirichlet -h)
  --version        the installed fl-merge's version
  -m, --multirun   one job per combination of comma-separated values
  --cfg job        print the composed config (Hydra; null = the default above)
  --hydra-help     Hydra's own help: its flags, sweepers, launchers, hydra.* keys

More: README.md (every key's meaning), docs/sweeps.md (the config tree), docs/merge.md.
"""


def help_page(overrides: Sequence[str] = ()) -> str:
    """`fl-merge --help`: the usage, the subcommands, every group's options (* the one
    chosen) and every key with the default a run uses, composed with `overrides` (a
    sweep's: its first job's). Raises ConfigError (one line) when they do not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    mine = [o for o in overrides if not _is_hydra_override(o)]
    first = expand(mine, True)[0] if mine else []  # a sweep's first job
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3", job_name="fl-merge"):
        try:
            cfg = compose(CONFIG_NAME, overrides=first, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(composition_error(e, first)) from None
        choices = dict(cfg.hydra.runtime.choices)
        loader = GlobalHydra.instance().config_loader()
        options = {g: [o for o in loader.get_group_options(g) if not o.startswith("_")] for g in GROUPS}
    lines = [USAGE, "config groups (GROUP=OPTION; * = chosen; experiment: +experiment=NAME, a preset):"]
    for group in GROUPS:
        lines += _rows(group, [o + ("*" if choices.get(group) == o else "") for o in options[group]])
    lines += ["", "keys (GROUP.KEY=VALUE, top level KEY=VALUE; each shown at the value a run uses;",
              "      method.PARAM=VALUE sets a parameter of the chosen method, e.g. method.density=0.3):"]
    keys = key_defaults(OmegaConf.to_container(cfg, resolve=False))
    for group, items in keys.items():
        lines += _rows(group or "(top)", items)
    return "\n".join([*lines, "", EPILOG])
