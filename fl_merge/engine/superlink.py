"""The ``superlink`` engine of `fl_merge.engine.run.run`: `flwr run` of this app against a private
local SuperLink, as a Flower user would run it, plus what a bare `flwr run .` lacks:

* a SuperLink of our own on free ports in a private FLWR_HOME, with runtime dependency
  installation disabled (the app runs in this environment, no uv installs), stopped with
  everything it started afterwards;
* the run's final status (`flwr run` exits 0 even when a run fails) turned into RunFailed;
* the app directory found from the installed package, so it works from any directory.

Why not Flower's own helper: `flwr run` starts a local SuperLink itself
(`flwr.cli.local_superlink.ensure_local_superlink`, a private function), but that one is
detached, shared by every run on fixed ports (39091/39093 unless set in the environment
before flwr is imported), in ``$FLWR_HOME/local-superlink``, and never stopped: no handle to
stop it, and two parallel runs (tests, sweeps) would share it. `LocalSuperLink` runs the same
`flower-superlink --simulation` command but owns the process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.deploy.processes import (
    ROOT,
    TAG_VAR,
    RunFailed,
    child_env,
    exit_text,
    new_tag,
    stop_group,
    stream_child,
)


def app_dir() -> Path:
    """The Flower app directory (pyproject.toml with [tool.flwr.app]) of this installation:
    the checkout holding the fl_merge package. ConfigError if there is none (a wheel install
    has no app directory: use the ``simulation`` engine there)."""
    path = ROOT / "pyproject.toml"
    if not path.is_file() or "[tool.flwr.app]" not in path.read_text():
        raise ConfigError(f"no Flower app at {ROOT} (pyproject.toml with [tool.flwr.app]); "
                          f"the superlink engine needs a checkout, use the simulation engine")
    return ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this environment (next to the running Python), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


class LocalSuperLink:
    """A simulation SuperLink owned by this process (own session; stopped as a group)."""

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
                raise RunFailed(f"flower-superlink exited with code {self.proc.returncode}; "
                                f"log: {self.log_file}")
            try:
                if httpx.get(url, timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RunFailed(f"flower-superlink did not answer within {timeout:.0f}s; log: {self.log_file}")

    def stop(self) -> None:
        """SIGTERM to the SuperLink's group, then SIGKILL to whatever is left of it: its
        tree and every process carrying its tag (TAG_VAR). flower-superlink starts its
        SuperExec (and so the ServerApp) in a session of its own, and after the SuperLink
        died they are no longer in its tree: the tag still finds them."""
        if self.proc is not None:
            proc, self.proc = self.proc, None
            stop_group(proc.pid, grace=10.0, wait=lambda t: proc.wait(timeout=t),
                       first=signal.SIGTERM, tag=self.env.get(TAG_VAR, ""))

    def died(self) -> str | None:
        """How the SuperLink ended ('killed by SIGKILL'), or None while it runs."""
        code = self.proc.poll() if self.proc is not None else None
        return None if code is None else exit_text(code)


def _run_status(env: dict[str, str]) -> tuple[str, str, str]:
    """(run id, status text, status details) of the one run on our private SuperLink; the
    details of a failed run hold the ServerApp's exception (`failure_details`)."""
    out = subprocess.run([_bin("flwr"), "ls", "--format", "json"], env=env, capture_output=True,
                         text=True, timeout=60)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        raise RunFailed(f"cannot read run status from `flwr ls`: {out.stdout[-500:]} {out.stderr[-500:]}")
    if not runs:
        raise RunFailed("the SuperLink reports no run: `flwr run` did not submit it")
    run = runs[-1]
    return str(run.get("run-id", "?")), str(run.get("status", "?")), str(run.get("status-details") or "")


FLOWER_FAILURE_PREFIX = "Simulation failed with exception: "


def failure_details(details: str) -> str:
    """Flower's status details of a failed run (`flwr ls`) as the cause in one line: the
    ServerApp's exception text without Flower's prefix; '' when Flower gave none."""
    text = details.strip()
    if text.startswith(FLOWER_FAILURE_PREFIX):
        text = text[len(FLOWER_FAILURE_PREFIX):]
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def flwr_run(run_cfg: RunConfig, supernodes: int, gpus: float, log_path: Path, stream: bool,
             app: Path | None = None, keep_superlink: bool = False,
             app_config: dict | None = None) -> None:
    """`flwr run <app> --stream` of a prepared config (output dir fixed) on a private
    SuperLink; the streamed output goes to `log_path` (and stdout). `app`: the Flower app
    directory (default: this installation's, `app_dir`); only the keys it declares are sent
    (Flower refuses others), `app_config` for its own keys. Raises RunFailed."""
    from fl_merge.config.flower_app import LAUNCHER_LOG_VAR, OUTPUT_DIR_VAR, flower_overrides, read_flower_app
    from fl_merge.models.registry import cache_root

    flower_app = read_flower_app(app if app is not None else app_dir())
    app = flower_app.path
    flwr_home = Path(tempfile.mkdtemp(prefix="fl-merge-flwr-"))
    env = {
        **child_env(),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(app), os.environ.get("PYTHONPATH")])),
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # The app runs in this environment: no uv install of its dependencies per run.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        TAG_VAR: new_tag(),  # everything this run starts, found and stopped afterwards
        "FL_MERGE_CACHE": str(cache_root()),
        OUTPUT_DIR_VAR: run_cfg.output_dir,  # for an app that does not declare output-dir
        LAUNCHER_LOG_VAR: str(log_path),  # this process writes run.log, not the ServerApp
        # The SuperLink starts its helpers (superexec, simulation) by name: they must be
        # this environment's, also when the venv is not activated (e.g. `make test`).
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        # A Ray of its own per run: without an address, ray.init() joins the cluster that
        # `ray start` recorded in <Ray temp dir>/ray/ray_current_cluster (a user's cluster on
        # the same machine, maybe with no CPU free for our clients). A user's RAY_ADDRESS wins.
        "RAY_ADDRESS": os.environ.get("RAY_ADDRESS") or "local",
    }
    link = LocalSuperLink(flwr_home, env)
    ok = False
    try:
        link.start()
        # Every key the app declares, fl-merge's in RunConfig's own (pyproject's) types.
        sent = flower_overrides(flower_app, run_cfg.to_flower(), app_config or {})
        items = " ".join(f"{k}={toml_value(v)}" for k, v in sent.items())
        cmd = [_bin("flwr"), "run", str(app), "--stream",
               "--federation-config", f"num-supernodes={supernodes} client-resources-num-cpus=1 "
                                      f"client-resources-num-gpus={gpus}",
               *(["--run-config", items] if items else [])]
        code, _ = stream_child(cmd, log_path, stream, env)
        if (how := link.died()) is not None:
            raise RunFailed(f"the SuperLink died during the run ({how}); `flwr run` exited with "
                            f"code {code} (log: {log_path}; SuperLink log: {link.log_file})")
        if code != 0:
            raise RunFailed(f"`flwr run` exited with code {code} (log: {log_path}; "
                            f"SuperLink log: {link.log_file})")
        try:
            run_id, status, details = _run_status(env)
        except RunFailed:
            if (how := link.died()) is not None:  # it died after `flwr run` returned
                raise RunFailed(f"the SuperLink died before the run's status was read ({how}); "
                                f"log: {log_path}; SuperLink log: {link.log_file}") from None
            raise
        if status != "finished:completed":  # the cause, as Flower recorded it, in the one line
            cause = failure_details(details)
            raise RunFailed(f"Flower run {run_id} ended as '{status}'{': ' + cause if cause else ''} "
                            f"(log: {log_path}; SuperLink log: {link.log_file})")
        ok = True
    finally:
        if keep_superlink and link.proc is not None:
            print(f"SuperLink left running (pid {link.proc.pid}); stop it with: "
                  f"kill -- -{link.proc.pid}; FLWR_HOME={flwr_home}")
        else:
            link.stop()
            if ok:
                shutil.rmtree(flwr_home, ignore_errors=True)
