"""`fl-merge-run`: one fl-merge run through `flwr run` (the ``superlink`` engine of
`fl_merge.engine.run.run`), from any directory.

    fl-merge-run --run-config 'method=ties method-params="density=0.3" num-clients=4'

What it adds to a bare `flwr run .`:
* validates the run config before anything starts (one-line error, exit 2); the defaults
  are RunConfig's (fl_merge/config/run_config.py), whatever the current directory, or with
  --app DIR those the app declares (docs/own_app.md);
* pretrains/caches the base model here, with a progress bar in your terminal;
* starts its own local SuperLink on free ports in a private FLWR_HOME (fl_merge.engine.superlink);
* reads the run's final status (flwr run exits 0 even when a run fails) and exits 1 on
  failure;
* prints the per-task summary and the output directory (layout: README "Output layout");
* stops the SuperLink and everything it started, unless --keep-superlink.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import textwrap
import tomllib
from pathlib import Path

from fl_merge.cli.usage import version_line
from fl_merge.core.values import parse_value
from fl_merge.io import results
from fl_merge.config.flower_app import (app_imports, app_run_config, check_client_app, read_flower_app,
                                        split_run_config)
from fl_merge.config.run_config import ConfigError, ResolvedConfig, RunConfig
from fl_merge.engine.run import ENGINES, RunFailed, prepare, run
from fl_merge.round.failures import EXIT_STATUS_HELP, lost_clients_exit, lost_clients_report


def _parse_run_config(items: list[str]) -> dict:
    """'k=v k2=v2' strings (or paths to TOML files) -> dict. Values go through
    fl_merge.core.values.parse_value (true/false, a number, else text: method=ties needs no
    quotes); shell quotes group a value with spaces or commas."""
    import shlex

    out: dict = {}
    for item in items:
        if item.endswith(".toml") and (Path(item).is_file() or "=" not in item):
            out.update(_read_toml(item))
            continue
        for pair in shlex.split(item):
            if "=" not in pair:
                raise ConfigError(f"--run-config item '{pair}' is not key=value")
            key, value = pair.split("=", 1)
            out[key.strip()] = parse_value(value)
    return out


def _read_toml(path: str) -> dict:
    """A --run-config TOML file's keys; ConfigError (one line) when it is missing or not TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--run-config {path}: no such file (give a TOML file of run-config keys "
                          "or key=value items)") from None
    except OSError as e:
        raise ConfigError(f"--run-config {path}: cannot read this TOML file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--run-config {path} is not valid TOML: {e}") from None


def _parser() -> argparse.ArgumentParser:
    intro, _, rest = __doc__.partition("\n\n")  # the first sentence whole, then the rest as it is
    parser = argparse.ArgumentParser(prog="fl-merge-run",
                                     epilog="example:\n" + rest + "\n" + EXIT_STATUS_HELP,
                                     description=textwrap.fill(" ".join(intro.split()), 88),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line("fl-merge-run"))
    parser.add_argument("--run-config", "-c", action="append", default=[],
                        help="run-config keys (fl_merge.config.run_config.RunConfig, dashed), e.g. "
                             "'method=fedavg num-clients=6', or a TOML file of them")
    parser.add_argument("--num-supernodes", type=int, default=None,
                        help="simulated SuperNodes (default: num-clients)")
    parser.add_argument("--client-gpus", type=float, default=0.0,
                        help="GPU share per simulated client, e.g. 0.25 (default 0: CPU only)")
    parser.add_argument("--app", default=None,
                        help="a Flower app directory whose ServerApp is fl-merge's, e.g. your own "
                             "ClientApp's (docs/own_app.md); its [tool.flwr.app.config] values are the "
                             "defaults and only the keys it declares may be set (default: this "
                             "installation's checkout)")
    parser.add_argument("--engine", default="superlink", choices=ENGINES,
                        help="superlink: `flwr run` on a private local SuperLink (default); "
                             "simulation: Flower's in-process engine, as `fl-merge` uses")
    parser.add_argument("--seeds", default=None,
                        help="replicates: run the config once per seed (e.g. 0,1,2) into "
                             "<output-dir>/seed-<s>/ and write replicates.csv/png there: mean test "
                             "accuracy over seeds with 95%% CIs, paired differences vs Task Arithmetic")
    parser.add_argument("--data-seeds", action="store_true",
                        help="with --seeds: each replicate also sets data-seed to its seed")
    parser.add_argument("--no-cache", action="store_true",
                        help="retrain every client even when its update is cached")
    parser.add_argument("--keep-superlink", action="store_true",
                        help="leave the SuperLink running afterwards (prints how to stop it)")
    return parser


def resolve_args(argv: list[str]) -> tuple[argparse.Namespace, ResolvedConfig, int, float]:
    """The command line -> (options, the resolved config with its output dir fixed,
    SuperNodes, GPU share per client), everything validated once (the run is handed this
    ResolvedConfig, not resolved again); raises ConfigError (one line). Nothing starts here."""
    args = _parser().parse_args(argv)
    overrides = _parse_run_config(args.run_config)
    if args.no_cache:
        overrides["cache"] = False
    if args.seeds is not None:
        from fl_merge.engine.replicates import parse_seeds

        try:
            parse_seeds(args.seeds)
        except ValueError as e:
            raise ConfigError(f"--seeds: {e}") from None
        if "seed" in overrides:
            raise ConfigError("--seeds sets seed per replicate: drop seed= from --run-config")
    elif args.data_seeds:
        raise ConfigError("--data-seeds goes with --seeds (replicates), e.g. --seeds 0,1,2 --data-seeds")
    own_clients, app_config = False, {}
    if args.app is not None:  # the app's declared values are the defaults (Flower's rule)
        app = read_flower_app(args.app)
        if args.seeds is not None and app.own_clients:
            raise ConfigError("--seeds sets fl-merge's seed per replicate, which only fl-merge's own "
                              "ClientApp trains with: run your app once per seed of its own")
        overrides, app_config = split_run_config(app_run_config(app, overrides))
        own_clients = app.own_clients
    run_cfg = RunConfig.from_flower(overrides)  # unset keys: RunConfig's defaults
    supernodes = args.num_supernodes or run_cfg.num_clients
    if supernodes < run_cfg.num_clients:
        raise ConfigError(f"num-clients={run_cfg.num_clients} is larger than the "
                          f"{supernodes} available clients (--num-supernodes)")
    # The app's code (its ClientApp, a python: base-checkpoint, plugins) is imported for the
    # checks only: afterwards this process's sys.path is as before (app_imports).
    with app_imports(app.path) if args.app is not None else contextlib.nullcontext():
        if args.app is not None:
            check_client_app(app)
        resolved = run_cfg.resolve(own_clients)
    resolved, supernodes, gpus = prepare(resolved, supernodes, args.client_gpus,
                                         ("--num-supernodes", "--client-gpus"))
    return args, dataclasses.replace(resolved, app_config=app_config), supernodes, gpus


def main(argv: list[str] | None = None) -> int:
    try:
        args, resolved, supernodes, gpus = resolve_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"fl-merge-run: error: {e}", file=sys.stderr)
        return 2
    run_cfg = resolved.run
    print(f"fl-merge: {run_cfg.num_clients} clients ({', '.join(resolved.tasks)}); "
          f"method={run_cfg.method}; output {run_cfg.output_dir}", flush=True)
    if args.seeds is not None:
        return _replicates(args, run_cfg, supernodes, gpus)
    try:
        outcome = run(resolved, num_supernodes=supernodes, client_gpus=gpus, engine=args.engine,
                      app=Path(args.app) if args.app else None, keep_superlink=args.keep_superlink)
    except (RunFailed, ConfigError) as e:  # ConfigError: found before any process started
        print(f"fl-merge-run: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print()
    print(results.format_summary(outcome.rows, "fl-merge: test accuracy per task "
                                               "(merged at the eta chosen on validation)"))
    print(f"\nresults: {outcome.out_dir}")
    for line in lost_clients_report(outcome.meta, run_cfg.min_clients, run_cfg.num_clients):
        print(f"fl-merge-run: {line}", file=sys.stderr)  # at the end, where it is seen
    return lost_clients_exit(outcome.meta, run_cfg.min_clients)


def _replicates(args: argparse.Namespace, run_cfg: RunConfig, supernodes: int, gpus: float) -> int:
    """--seeds: the config once per seed through `run`, then the over-seed table
    (fl_merge.engine.replicates); every replicate's config is checked before the first one trains."""
    from fl_merge.engine.replicates import format_table, parse_seeds, run_replicates

    base = {k: v for k, v in run_cfg.to_flower().items() if k not in ("seed", "output-dir", "data-seed")}
    if not args.data_seeds:
        base["data-seed"] = run_cfg.data_seed

    lost: list[str] = []  # each replicate's lost clients, named at the end
    code = 0

    def one(cfg: ResolvedConfig) -> Path:  # resolved once, by run_replicates
        nonlocal code
        outcome = run(cfg, num_supernodes=supernodes, client_gpus=gpus,
                      engine=args.engine, app=Path(args.app) if args.app else None)
        k, floor = cfg.run.num_clients, cfg.run.min_clients
        lost.extend(f"seed {cfg.run.seed}: {line}" for line in lost_clients_report(outcome.meta, floor, k))
        code = max(code, lost_clients_exit(outcome.meta, floor))
        return outcome.out_dir

    try:
        rows = run_replicates(base, parse_seeds(args.seeds), Path(run_cfg.output_dir), one, args.data_seeds)
    except (RunFailed, ValueError) as e:  # ConfigError is a ValueError
        print(f"fl-merge-run: error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, RunFailed) else 1
    print()
    print(format_table(rows))
    print(f"\nreplicates: {run_cfg.output_dir}")
    for line in lost:
        print(f"fl-merge-run: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
