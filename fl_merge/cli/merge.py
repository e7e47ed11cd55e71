"""`fl-merge merge`: merge checkpoint files without Flower, mergekit-style.

    fl-merge merge --base BASE --models M1 M2 ... --method NAME [--param k=v ...]
                   (--lambda L | --eta E | --lines alpha=A beta=B [pattern=RE])
                   --out (OUT.safetensors | FOLDER) [--overwrite]
    fl-merge merge CONFIG.yaml

Also `python -m fl_merge.cli.merge ...`. The engine is fl_merge.io.file_merge; docs/merge.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from fl_merge.merging.lines import check_lines
from fl_merge.merging.scales import check_eta, check_lambda, eta_for_lambda, lambda_scale
from fl_merge.methods import available_methods
from fl_merge.cli.usage import version_line
from fl_merge.core.safetensors_writer import DEFAULT_MAX_SHARD_BYTES
from fl_merge.io.checkpoints import FORMATS, parse_dtype, parse_size
from fl_merge.io.file_merge import NON_FLOAT_POLICIES, merge_files, method_scope
from fl_merge.io.merge_output import base_model_folder, is_folder_output
from fl_merge.io.output_paths import unwritable_reason
from fl_merge.core.task_vectors import MergeInputError
from fl_merge.core.values import parse_value

PROG = "fl-merge merge"
# YAML keys (the long flags' names with '_' for '-'); `params` is a mapping there.
CONFIG_KEYS = ("base", "models", "method", "params", "lambda", "eta", "out", "dtype",
               "max_shard_size", "non_float", "weights", "local_steps", "normalisers", "lines",
               "extras", "overwrite")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise MergeInputError(message)


def methods_help() -> str:
    """One line per registered method: how it runs on files and its lambda scale."""
    lines = []
    for name in available_methods():
        scope = method_scope(name)
        scale = "" if scope.startswith("refused") else (
            f"; lambda scale '{lambda_scale(name)}'")
        lines.append(f"  {name:17s} {scope}{scale}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge checkpoints tensor by tensor: theta0 + eta * Delta(method, "
                    "theta_i - theta0). BASE and models: " + FORMATS + ".",
        epilog="methods ('exact': per tensor, or per tensor after the method's declared pass "
               "over the whole update, is the method; 'per-tensor': a layer-wise variant of a "
               "whole-vector method; lambda scale 'sum': eta = K * lambda, 'delta': "
               "eta = lambda):\n" + methods_help()
               + "\n\nSee docs/merge.md.")
    p.add_argument("--version", action="version", version=version_line(PROG))
    p.add_argument("config", nargs="?", help="YAML file with keys " + ", ".join(CONFIG_KEYS)
                   + " (instead of the flags)")
    p.add_argument("--base", help="the pretrained model theta0")
    p.add_argument("--models", nargs="+", help="the fine-tuned models theta_1 ... theta_K")
    p.add_argument("--method", help="a registered merge method (list below)")
    p.add_argument("--param", nargs="+", action="extend", default=[], metavar="K=V",
                   help="method parameter: true/false, a number or text (density=0.2, base=ties)")
    p.add_argument("--lambda", dest="lambda_", type=float,
                   help="Task Arithmetic's lambda, converted to eta by the method's scale")
    p.add_argument("--eta", type=float, help="the scale of Delta directly")
    p.add_argument("--lines", nargs="+", action="extend", default=[], metavar="K=V",
                   help="LiNeS layer scaling instead of --lambda: alpha=A beta=B [pattern=RE]; "
                        "tensor of layer l of L gets lambda = A + B (l-1)/(L-1), a tensor "
                        "without a layer index A (fl_merge/merging/lines.py)")
    p.add_argument("--out", help="OUT.safetensors (shards + index beside it when large) "
                   "or a folder: a Hugging Face model folder with the base folder's config.json, "
                   "tokenizer and other non-weight files")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing output (a non-empty folder, or OUT.safetensors "
                        "and its shards) whole; without it an existing output is refused")
    p.add_argument("--dtype", help="output float dtype (default: the base's per tensor)")
    p.add_argument("--max-shard-size", default=None,
                   help=f"largest output shard, e.g. 2GB (default {DEFAULT_MAX_SHARD_BYTES:,} bytes)")
    p.add_argument("--non-float", choices=NON_FLOAT_POLICIES, default=None,
                   help="int/bool tensors: 'agree' (default) copies the base's when every "
                        "model agrees and stops otherwise; 'base' keeps the base's always")
    p.add_argument("--weights", nargs="+", type=float, help="per-model weights p_i")
    p.add_argument("--local-steps", nargs="+", type=float, help="per-model local steps (fednova)")
    p.add_argument("--normalisers", nargs="+", type=float,
                   help="per-model FedNova normalisers a_i")
    p.add_argument("--extras", nargs="+", action="extend", default=[], metavar="NAME=F1,...,FK",
                   help="per-model arrays a method needs, one safetensors file per model keyed by "
                        "the base's tensor names (gram=g1.safetensors,g2.safetensors for regmean)")
    return p


def parse_extras(items: Sequence[str]) -> dict[str, list[str]]:
    """['gram=a.st,b.st'] -> {'gram': ['a.st', 'b.st']}."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, files = str(item).partition("=")
        if not sep or not name or not files or name in out:
            raise MergeInputError(f"--extras wants name=F1,...,FK once per name, got {item!r}")
        out[name] = [f for f in files.split(",") if f]
    return out


def parse_params(items: Sequence[str]) -> dict:
    """['density=0.2', 'base=ties'] -> {'density': 0.2, 'base': 'ties'} (values through
    fl_merge.core.values.parse_value, as everywhere in fl-merge)."""
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise MergeInputError(f"--param wants key=value, got {item!r}")
        out[key] = parse_value(value)
    return out


def load_config(path: str) -> dict:
    """The YAML config as flag values (dest names)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        raise MergeInputError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise MergeInputError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise MergeInputError(f"config {path} must be a mapping with keys {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(map(str, cfg)) - set(CONFIG_KEYS))
    if unknown:
        raise MergeInputError(f"config {path}: unknown key(s) {unknown}; known: "
                              f"{', '.join(CONFIG_KEYS)}")
    extras = cfg.get("extras") or {}
    if not isinstance(extras, dict) or any(not isinstance(v, list) for v in extras.values()):
        raise MergeInputError(f"config {path}: extras must map a name to a list of files, got {extras!r}")
    for key in ("params", "lines"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise MergeInputError(f"config {path}: {key} must be a mapping, got {cfg[key]!r}")
    models = cfg.get("models")
    if models is not None and (isinstance(models, (str, dict)) or not isinstance(models, list)):
        raise MergeInputError(f"config {path}: models must be a list of paths, got {models!r}")
    out = {k.replace("lambda", "lambda_"): v for k, v in cfg.items()}
    out["params"] = dict(cfg.get("params") or {})
    return out


def resolve(argv: Sequence[str] | None) -> dict:
    """Arguments (flags or YAML) -> merge_files keyword arguments, all checked."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k != "config" and v not in (None, [])}
    if args.config is not None:
        if given:
            raise MergeInputError(f"give either a config file or flags, not both "
                                  f"(got {args.config} and --{next(iter(given)).rstrip('_')})")
        opts = load_config(args.config)
    else:
        opts = dict(given)
        opts["params"] = parse_params(opts.pop("param", []))
        if "lines" in opts:
            opts["lines"] = parse_params(opts["lines"])
        opts["extras"] = parse_extras(opts.pop("extras", []))
    for key, flag in (("base", "--base"), ("models", "--models"), ("method", "--method"),
                      ("out", "--out")):
        if opts.get(key) in (None, "", []):
            raise MergeInputError(f"missing {flag} (usage: {PROG} --base BASE --models M1 M2 ... "
                                  "--method NAME (--lambda L | --eta E) --out OUT.safetensors)")
    out_problem = unwritable_reason(opts["out"], as_file=str(opts["out"]).endswith(".safetensors"))
    if out_problem is not None:  # before any checkpoint is read
        raise MergeInputError(f"--out {opts['out']} cannot be written: {out_problem}")
    lam, eta = opts.pop("lambda_", None), opts.pop("eta", None)
    lines = opts.pop("lines", None)
    if lines is not None:
        if lam is not None or eta is not None:
            raise MergeInputError("--lines replaces --lambda/--eta (each tensor gets lambda = "
                                  "alpha + beta (l-1)/(L-1)): give no --lambda or --eta with it")
        lines = check_lines(lines, allow_auto=False)
        lam = 1.0  # LiNeS's scales are in the method's lambda units: theta0 + scale(l) tau_MTL
    if (lam is None) == (eta is None):
        raise MergeInputError("give exactly one of --lambda (Task Arithmetic's lambda) or --eta "
                              f"(the scale of Delta), got {'both' if lam is not None else 'neither'}")
    models = [str(m) for m in opts.pop("models")]
    method, params = str(opts.pop("method")), opts.pop("params")
    lam = None if lam is None else check_lambda(lam)  # the run config's rules, shared
    eta = None if eta is None else check_eta(eta)
    extras = {str(n): [str(f) for f in fs] for n, fs in (opts.pop("extras", None) or {}).items()}
    if lam is not None:
        scope = method_scope(method, params, list(extras))
        if scope.startswith("refused"):
            raise MergeInputError(f"merge method '{method}' cannot merge checkpoint files: "
                                  f"{scope[9:]}")
        eta = eta_for_lambda(method, float(lam), len(models), params)
    kw = {"base": str(opts.pop("base")), "models": models, "method": method,
          "eta": float(eta), "out": str(opts.pop("out")), "params": params,
          **({"extras": extras} if extras else {})}
    if opts.get("dtype") is not None:
        kw["dtype"] = parse_dtype(opts.pop("dtype"))
    if opts.get("max_shard_size") is not None:
        kw["max_shard_bytes"] = parse_size(opts.pop("max_shard_size"))
    if opts.get("overwrite") is not None:
        if not isinstance(opts["overwrite"], bool):
            raise MergeInputError(f"overwrite must be true or false, got {opts['overwrite']!r}")
        kw["overwrite"] = opts.pop("overwrite")
    for key in ("non_float", "weights", "local_steps", "normalisers"):
        if opts.get(key) is not None:
            kw[key] = opts.pop(key)
    if lines is not None:
        kw["lines"] = lines
    return kw


def output_note(base: str, out: str) -> str:
    """What the user should know about loading the output with transformers, or ''."""
    folder = base_model_folder(base)
    if not is_folder_output(out):
        return "" if folder is None else (
            f"{out} holds the weights only; give --out FOLDER for a Hugging Face model folder "
            f"with {folder}'s config.json and tokenizer, which transformers loads")
    if folder is None:
        return (f"{out} has no config.json: the base {base} is a lone file, not a model folder "
                "(transformers.AutoModel needs config.json; give the base as its folder)")
    if not (Path(out) / "config.json").is_file():
        return (f"{out} has no config.json because {folder} has none: transformers.AutoModel "
                "cannot load it")
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        kw = resolve(argv)
        files = merge_files(**kw)
    except MergeInputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: {kw['method']} of {len(kw['models'])} models at eta={kw['eta']:g} -> "
          + ", ".join(str(f) for f in files))
    note = output_note(kw["base"], kw["out"])
    if note:
        print(f"{PROG}: note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
