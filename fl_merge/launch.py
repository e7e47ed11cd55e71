"""`fl-merge-run`: the demo launcher around `flwr run`.

What it adds to a bare `flwr run .`:
* validates the run config before anything starts (one-line error, exit 2);
* pretrains/caches the base model here, with a progress bar in your terminal;
* starts its own local SuperLink on free ports in a private FLWR_HOME, with runtime
  dependency installation disabled (the app runs in this environment, no uv installs);
* reads the run's final status (flwr run exits 0 even when a run fails) and exits 1 on
  failure, showing the end of the logs;
* prints the per-task summary and the output directory;
* stops the SuperLink and everything it started, unless --keep-superlink.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from fl_merge import results
from fl_merge.config import ConfigError, RunConfig, check_client_gpus
from fl_merge.models import PretrainConfig, cache_root, pretrained_backbone


class LaunchError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app_defaults(app_dir: Path) -> dict:
    with open(app_dir / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"].get("config", {})


def _parse_run_config(items: list[str]) -> dict:
    """'k=v k2=v2' strings (or paths to TOML files) -> dict. Values are TOML; a bare word
    that is not valid TOML is taken as a string, so method=ties works without quotes."""
    import shlex

    out: dict = {}
    for item in items:
        if item.endswith(".toml") and Path(item).is_file():
            with open(item, "rb") as f:
                out.update(tomllib.load(f))
            continue
        for pair in shlex.split(item):
            if "=" not in pair:
                raise ConfigError(f"--run-config item '{pair}' is not key=value")
            key, value = pair.split("=", 1)
            try:
                out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                out[key.strip()] = value
    return out


def _bin(name: str) -> str:
    """A console script of this environment (next to the running Python), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


class LocalSuperLink:
    """A simulation SuperLink owned by this process (own session; killed as a group)."""

    def __init__(self, flwr_home: Path, env: dict[str, str]):
        self.flwr_home = flwr_home
        self.env = env
        self.log_file = flwr_home / "superlink.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        cmd = [
            _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--control-api-address", f"127.0.0.1:{self.env['FLWR_LOCAL_CONTROL_API_PORT']}",
            "--host", "127.0.0.1", "--port", self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"],
            "--database", str(self.flwr_home / "state.db"), "--log-file", str(self.log_file),
        ]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        import httpx

        url = f"http://127.0.0.1:{self.env['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']}/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(f"flower-superlink exited with code {self.proc.returncode}; "
                                  f"log: {self.log_file}")
            try:
                if httpx.get(url, timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise LaunchError(f"flower-superlink did not answer within {timeout:.0f}s; log: {self.log_file}")

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                # Children (ServerApp, simulation, Ray workers) share the session: sweep them.
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None


def _run_status(env: dict[str, str]) -> tuple[str, str]:
    """(run id, status text) of the one run on our private SuperLink."""
    out = subprocess.run([_bin("flwr"), "ls", "--format", "json"], env=env, capture_output=True,
                         text=True, timeout=60)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        raise LaunchError(f"cannot read run status from `flwr ls`: {out.stdout[-500:]} {out.stderr[-500:]}")
    if not runs:
        raise LaunchError("the SuperLink reports no run: `flwr run` did not submit it")
    run = runs[-1]
    return str(run.get("run-id", "?")), str(run.get("status", "?"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-merge-run", description=__doc__.split("\n")[0])
    parser.add_argument("--run-config", "-c", action="append", default=[],
                        help="overrides of [tool.flwr.app.config], e.g. 'method=fedavg num-clients=6'")
    parser.add_argument("--num-supernodes", type=int, default=None,
                        help="simulated SuperNodes (default: num-clients)")
    parser.add_argument("--client-gpus", type=float, default=0.0,
                        help="GPU share per simulated client, e.g. 0.25 (default 0: CPU only)")
    parser.add_argument("--app", default=".", help="the Flower app directory (default: .)")
    parser.add_argument("--no-cache", action="store_true",
                        help="retrain every client even when its update is cached")
    parser.add_argument("--keep-superlink", action="store_true",
                        help="leave the SuperLink running afterwards (prints how to stop it)")
    args = parser.parse_args(argv)
    app_dir = Path(args.app).resolve()

    try:
        overrides = _parse_run_config(args.run_config)
        if args.no_cache:
            overrides["cache"] = False
        run_cfg = RunConfig.from_flower({**_app_defaults(app_dir), **overrides})
        cfg = run_cfg.resolve()
        check_client_gpus(args.client_gpus, "--client-gpus")
        supernodes = args.num_supernodes or run_cfg.num_clients
        if supernodes < run_cfg.num_clients:
            raise ConfigError(f"num-clients={run_cfg.num_clients} is larger than the "
                              f"{supernodes} available clients (--num-supernodes)")
    except ConfigError as e:
        print(f"fl-merge-run: error: {e}", file=sys.stderr)
        return 2

    out_dir = cfg.output_dir()
    # Hand flwr the values in RunConfig's own types (pyproject's types), normalized.
    flower_values = run_cfg.to_flower()
    overrides = {k.replace("_", "-"): flower_values[k.replace("_", "-")] for k in overrides}
    overrides["output-dir"] = str(out_dir)
    print(f"fl-merge: {run_cfg.num_clients} clients on tasks {', '.join(cfg.tasks)}; "
          f"method={run_cfg.method}; output {out_dir}", flush=True)
    # Pretrain here (progress bar in this terminal); the ServerApp then finds it cached.
    pretrained_backbone(run_cfg.model, PretrainConfig(steps=run_cfg.pretrain_steps,
                                                      seed=run_cfg.pretrain_seed))

    flwr_home = Path(tempfile.mkdtemp(prefix="fl-merge-flwr-"))
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # The app runs in this environment: no uv install of its dependencies per run.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FL_MERGE_CACHE": str(cache_root()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(app_dir), os.environ.get("PYTHONPATH")])),
        # The SuperLink starts its helpers (superexec, simulation) by name: they must be
        # this environment's, also when the venv is not activated (e.g. `make test`).
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    link = LocalSuperLink(flwr_home, env)
    ok = False
    try:
        link.start()
        run_args = [f"{k}={_toml_value(v)}" for k, v in overrides.items()]
        cmd = [_bin("flwr"), "run", str(app_dir), "--stream",
               "--federation-config", f"num-supernodes={supernodes} client-resources-num-cpus=1 "
                                      f"client-resources-num-gpus={args.client_gpus}",
               "--run-config", " ".join(run_args)]
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise LaunchError(f"`flwr run` exited with code {proc.returncode}")
        run_id, status = _run_status(env)
        if status != "finished:completed":
            raise LaunchError(f"Flower run {run_id} ended as '{status}'")
        rows = results.read_rows(out_dir / results.RESULTS_FILE)
        print()
        print(results.format_summary(rows, "fl-merge: test accuracy per task (merged at the eta chosen on validation)"))
        print(f"\nresults: {out_dir}")
        ok = True
        return 0
    except (LaunchError, FileNotFoundError) as e:
        print(f"fl-merge-run: error: {e} (the run's log is above; SuperLink log: "
              f"{link.log_file})", file=sys.stderr)
        return 1
    finally:
        if args.keep_superlink:
            print(f"SuperLink left running (pid {link.proc.pid if link.proc else '?'}); "
                  f"stop it with: kill -- -{link.proc.pid if link.proc else '?'}; FLWR_HOME={flwr_home}")
        else:
            link.stop()
            if ok:
                shutil.rmtree(flwr_home, ignore_errors=True)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


if __name__ == "__main__":
    sys.exit(main())
