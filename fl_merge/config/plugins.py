"""A user's own merge methods, task builders and model builders, named by import path and
registered for one run (docs/extending.md has a worked example of each).

Run-config key ``plugins`` (Flower's flat string): items separated by commas or spaces,

    method:<name>=<module>.<function>   a merge function, registered as merge method <name>
    task:<name>=<module>.<function>     a task builder, registered as task <name>
    model:<name>=<module>.<function>    a model builder, registered as model <name>
    <module>                            a module imported for the registrations it makes itself
                                        (register / register_task / register_model at import)

Hydra configs say the same with ``_target_`` (`from_hydra`): ``method: {_target_: pkg.my_merge,
name: my_merge, alpha: 0.5}``, ``model: {_target_: pkg.tiny_cnn, name: tiny}``, a task entry
``data.tasks: [rotate90, {_target_: pkg.blobs, name: blobs}]``, or a top-level ``plugins``
list of the items above.

Contracts, checked when the plugin is registered (before any training), each failure one line
naming the item and what is expected:

* merge function: ``fn(stacked, weights, **params)`` (coordinate-wise: ``stacked`` [K, n],
  ``weights`` p [K] -> Delta [n]) or ``fn(task_vectors, weights, **params)`` (whole-vector:
  K dicts of tensors -> one dict), every hyper-parameter with its default in the signature;
  fl_merge.merging.registry.register is the full form (search space, client statistics,
  lambda scale, per-tensor exactness, checks, paper): a module whose function carries it
  (a method file, docs/extending.md "Add a method") is registered with those declarations,
  under the plugin's name too.
* task builder: ``fn(seed, sizes) -> fl_merge.tasks.registry.TaskData``; its inputs are images unless
  the function carries ``input_kind = "text"``.
* model builder: ``fn() -> torch.nn.Module`` with an int ``feature_dim`` (its output size)
  and optionally ``input_kind``; the module it returns carries theta0 (load published weights
  in it, or seed its initialisation).

Every process of a run registers the plugins from the run config: `RunConfig.resolve()` (the
CLI, the run's child process, the ServerApp) and each ClientApp from the ``plugins`` entry of
the config its messages carry, every handler alike (`load_run_plugins`; Ray workers and
SuperNodes are other processes). The modules
must be importable there (installed, or on PYTHONPATH). Registering the same function under
the same name again does nothing, so every process may call `load_plugins` as often as it likes.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("method", "task", "model")
FORMS = "method:<name>=<module>.<function>, task:<name>=..., model:<name>=... or <module>"


class PluginError(ValueError):
    """A plugin that cannot be imported or does not fit its contract (one line)."""


@dataclass(frozen=True)
class Plugin:
    kind: str  # method | task | model | module
    name: str  # registered name ("" for a module)
    target: str  # import path

    @property
    def item(self) -> str:
        return self.target if self.kind == "module" else f"{self.kind}:{self.name}={self.target}"


def parse_plugins(text: str | Sequence[str]) -> list[Plugin]:
    """The ``plugins`` string (or a list of items) -> Plugins; PluginError on a bad item."""
    items = text.replace(",", " ").split() if isinstance(text, str) else [str(t).strip() for t in text]
    out: list[Plugin] = []
    for item in (i for i in items if i):
        head, eq, target = item.partition("=")
        kind, colon, name = head.partition(":")
        if not eq and not colon:
            plugin = Plugin("module", "", item)
        elif kind in KINDS and colon and name and target:
            plugin = Plugin(kind, name, target)
        else:
            raise PluginError(f"plugin '{item}' is not one of {FORMS}")
        if plugin not in out:
            out.append(plugin)
    return out


def _import(plugin: Plugin) -> Any:
    try:
        if plugin.kind == "module":
            return importlib.import_module(plugin.target)
        return pkgutil.resolve_name(plugin.target)
    except (ImportError, AttributeError, ValueError, TypeError) as e:  # TypeError: a relative name ('.')
        raise PluginError(f"plugin '{plugin.item}': cannot import '{plugin.target}' ({e}); give an "
                          "import path module.function that every process of the run can import "
                          "(installed or on PYTHONPATH)") from None


def _signature(plugin: Plugin, fn: Any) -> inspect.Signature:
    if not callable(fn):
        raise PluginError(f"plugin '{plugin.item}': '{plugin.target}' is not a function "
                          f"(it is {type(fn).__name__} {fn!r})")
    return inspect.signature(fn)


def method_shape(fn: Callable) -> bool:
    """True for a coordinate-wise merge function (stacked, weights, ...), False for a
    whole-vector one (task_vectors, weights, ...); ValueError naming the expected forms."""
    from fl_merge.merging.registry import _RESERVED

    params = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in params[:2]]
    no_default = [p.name for p in params[2:] if p.name not in _RESERVED and p.default is p.empty
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if names not in (["stacked", "weights"], ["task_vectors", "weights"]) or no_default:
        raise ValueError("a merge function takes (stacked, weights, **params) (coordinate-wise) or "
                         "(task_vectors, weights, **params) (whole-vector), every hyper-parameter "
                         f"with a default; got {inspect.signature(fn)}")
    return names[0] == "stacked"


def _register_method(plugin: Plugin, fn: Any) -> None:
    from fl_merge.merging.registry import available_methods, get_method, register, register_again

    _signature(plugin, fn)
    if plugin.name in available_methods():
        if get_method(plugin.name).fn is fn:
            return
        raise PluginError(f"plugin '{plugin.item}': merge method '{plugin.name}' is already "
                          "registered (a built-in or another plugin): give it another name")
    if register_again(plugin.name, fn):  # a method file's register(...): its declarations
        return
    try:
        coordinatewise = method_shape(fn)
    except ValueError as e:
        raise PluginError(f"plugin '{plugin.item}': {e}") from None
    register(plugin.name, coordinatewise=coordinatewise)(fn)


def _register_task(plugin: Plugin, fn: Any) -> None:
    from fl_merge.tasks.registry import TASKS, SplitSizes, TaskData, register_task
    from fl_merge.models.registry import INPUT_KINDS

    sig = _signature(plugin, fn)
    existing = TASKS.get(plugin.name)
    if existing is not None:
        if getattr(existing, "__wrapped__", None) is fn:
            return
        raise PluginError(f"plugin '{plugin.item}': task '{plugin.name}' is already registered "
                          "(a built-in or another plugin): give it another name")
    try:
        sig.bind(0, SplitSizes())
    except TypeError:
        raise PluginError(f"plugin '{plugin.item}': a task builder takes (seed, sizes) and returns "
                          f"fl_merge.tasks.registry.TaskData; got {sig}") from None
    kind = getattr(fn, "input_kind", "image")
    if kind not in INPUT_KINDS:
        raise PluginError(f"plugin '{plugin.item}': input_kind must be one of {INPUT_KINDS}, got {kind!r}")

    def build(seed: int, sizes: SplitSizes) -> TaskData:
        data = fn(seed, sizes)
        if not isinstance(data, TaskData):
            raise TypeError(f"task '{plugin.name}' ({plugin.target}) returned a "
                            f"{type(data).__name__}, not fl_merge.tasks.registry.TaskData")
        return data

    build.__wrapped__ = fn  # type: ignore[attr-defined]
    register_task(plugin.name, kind)(build)


def _register_model(plugin: Plugin, fn: Any) -> None:
    from torch import nn

    from fl_merge.models.registry import INPUT_KINDS, MODELS, ModelSpec, register_model

    sig = _signature(plugin, fn)
    existing = MODELS.get(plugin.name)
    if existing is not None:
        if existing.build_backbone is fn:
            return
        raise PluginError(f"plugin '{plugin.item}': model '{plugin.name}' is already registered "
                          "(a built-in or another plugin): give it another name")
    try:
        sig.bind()
    except TypeError:
        raise PluginError(f"plugin '{plugin.item}': a model builder takes no arguments and returns "
                          f"a torch.nn.Module; got {sig}") from None
    module = fn()  # once, for its feature size and input kind
    dim = getattr(module, "feature_dim", None)
    if not isinstance(module, nn.Module) or isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise PluginError(f"plugin '{plugin.item}': a model builder returns a torch.nn.Module with a "
                          f"positive int feature_dim (its output size); got {type(module).__name__} "
                          f"with feature_dim={dim!r}")
    kind = getattr(module, "input_kind", "image")
    if kind not in INPUT_KINDS:
        raise PluginError(f"plugin '{plugin.item}': input_kind must be one of {INPUT_KINDS}, got {kind!r}")
    register_model(ModelSpec(plugin.name, fn, dim, input_kind=kind, load_pretrained=fn))


_REGISTER = {"method": _register_method, "task": _register_task, "model": _register_model}


def load_plugins(text: str | Sequence[str]) -> list[Plugin]:
    """Import and register every plugin of a ``plugins`` value in this process (idempotent);
    PluginError (one line) on the first that fails. Returns them."""
    plugins = parse_plugins(text)
    for plugin in plugins:
        obj = _import(plugin)
        if plugin.kind != "module":
            _REGISTER[plugin.kind](plugin, obj)
    return plugins


def load_run_plugins(config: Mapping[str, Any]) -> list[Plugin]:
    """Register the plugins a client message's config names (its ``plugins`` entry, from
    `ResolvedConfig.task_config`; none when absent) in this process: what every ClientApp
    handler does before it builds a task or a model."""
    return load_plugins(str(config.get("plugins", "") or ""))


# --------------------------------------------------------------------------- Hydra

def _target_name(target: Any, where: str) -> str:
    if not isinstance(target, str) or not target.strip():
        raise PluginError(f"{where}._target_ must be an import path module.function, got {target!r}")
    return target.strip().rsplit(".", 1)[-1]


def from_hydra(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A resolved Hydra config (plain dict) -> (the same without ``_target_`` entries, the
    plugin items they stand for). Pure: `data` is not modified.

    * ``method._target_``: registered as ``method.name`` (when ``name`` lists several methods,
      under the function's own name, which must be among them);
    * ``model._target_``: registered as ``model.name`` (default: the function's name);
    * a mapping ``{_target_: ..., name: ...}`` in ``data.tasks``: a task of that name (default:
      the function's name), listed in its place."""
    out = dict(data)
    items: list[str] = []
    for group in ("method", "model"):  # an unset _target_ (null: the model schema's) is nothing
        if isinstance(out.get(group), dict) and "_target_" in out[group] and out[group]["_target_"] is None:
            out[group] = {k: v for k, v in out[group].items() if k != "_target_"}
    method = out.get("method")
    if isinstance(method, dict) and "_target_" in method:
        method = dict(method)
        target = method.pop("_target_")
        own = _target_name(target, "method")
        names = method.get("name")
        if isinstance(names, (list, tuple)) or (isinstance(names, str) and "," in names):
            listed = list(names) if isinstance(names, (list, tuple)) else names.split(",")
            if own not in [str(n).strip() for n in listed]:
                raise PluginError(f"method._target_ '{target}' registers '{own}', which method.name "
                                  f"{names} does not list: add it")
            name = own
        else:
            name = str(names) if names else own
            method["name"] = name
        items.append(f"method:{name}={target.strip()}")
        out["method"] = method
    model = out.get("model")
    if isinstance(model, dict) and "_target_" in model:
        model = dict(model)
        target = model.pop("_target_")
        own = _target_name(target, "model")
        name = model.get("name") if model.get("name") not in (None, "???") else own
        model["name"] = str(name)
        items.append(f"model:{name}={target.strip()}")
        out["model"] = model
    tasks_group = out.get("data")
    if isinstance(tasks_group, dict) and isinstance(tasks_group.get("tasks"), (list, tuple)):
        entries = []
        for entry in tasks_group["tasks"]:
            if isinstance(entry, dict) and "_target_" in entry:  # else a task from data (data specs)
                if set(entry) - {"_target_", "name"}:
                    raise PluginError(f"data.tasks entry {entry}: a task plugin takes _target_ and name only")
                target = entry.get("_target_")
                own = _target_name(target, "data.tasks[]")
                name = str(entry.get("name") or own)
                items.append(f"task:{name}={target.strip()}")
                entries.append(name)
            else:
                entries.append(entry)
        out["data"] = {**tasks_group, "tasks": entries}
    return out, items
