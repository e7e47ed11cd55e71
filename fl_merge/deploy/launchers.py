"""Flower's `flower-supernode` and `flower-superlink` with one setting each that flwr 1.41
does not expose: `fl-merge-supernode --heartbeat-interval` and `fl-merge-superlink
--sqlite-busy-timeout`; every other argument goes to Flower's command unchanged. Each setting
is a module global of flwr's, set here, in this one place, before Flower's command starts;
tests/engine/test_heartbeat.py and tests/engine/test_superlink_sqlite.py run Flower's own code
after it and fail if a later flwr renames or stops reading it. Nothing else changes: the
SuperExecs, ClientApps and ServerApp the commands start are processes of their own with
Flower's defaults. No torch is loaded here (a SuperNode stays as small as Flower's).

The heartbeat. How soon a lost SuperNode is noticed is the SuperNode's own choice in flwr
1.41: it announces an interval when it activates and in every heartbeat (`heartbeat_interval`
of ActivateNodeRequest / SendNodeHeartbeatRequest), sends a heartbeat every
(interval - 5 s) x 0.8 +- 0.1, and the SuperLink declares it lost HEARTBEAT_PATIENCE (2) x the
interval it announced after its last heartbeat (linkstate `acknowledge_node_heartbeat`). The
SuperLink refuses an interval outside HEARTBEAT_MIN_INTERVAL..HEARTBEAT_MAX_INTERVAL
(10..1800 s, `fleet_handlers._validate_heartbeat_interval`: the node then fails to activate).
flwr 1.41 has no option, environment variable or config key for it: it is the constant
HEARTBEAT_DEFAULT_INTERVAL (30 s), read by the SuperNode's fleet connection and by the
heartbeat sender; `set_heartbeat_interval` sets both.

The busy timeout. With `--database FILE`, flwr 1.41 keeps the SuperLink's state and its
object store (every message's payload, in 5 MiB chunks) in one sqlite file and opens every
connection with `PRAGMA busy_timeout = 5000` (`SQLITE_PRAGMAS`, applied by
`flwr.supercore.sql_mixin._set_sqlite_pragmas`): a write that waits more than 5 s for the
database's single write lock fails with `sqlite3.OperationalError: database is locked`, and
the API call that made it answers HTTP 500. Deleting a model-sized message's objects (after
its receiver confirmed it) is one transaction; with a model of hundreds of MB on a loaded
machine it holds the lock for seconds (docs/deployment.md, "The SuperLink's state on disk").
flwr 1.41 has no option for the timeout; `set_busy_timeout` sets it in the pragma tuple that
`sql_mixin` reads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL, HEARTBEAT_PATIENCE

SUPERNODE_PROG = "fl-merge-supernode"
HEARTBEAT_OPTION = "--heartbeat-interval"
# Where flwr 1.41 reads the interval a SuperNode announces and paces its heartbeats by.
HEARTBEAT_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
HEARTBEAT_NAME = "HEARTBEAT_DEFAULT_INTERVAL"


def check_heartbeat_interval(seconds: float) -> float:
    """The interval, if Flower's SuperLink accepts it; ValueError naming the range if not
    (a shorter one is refused by the SuperLink, never clamped)."""
    if not HEARTBEAT_MIN_INTERVAL <= seconds <= HEARTBEAT_MAX_INTERVAL:
        raise ValueError(
            f"{HEARTBEAT_OPTION} must be {HEARTBEAT_MIN_INTERVAL}..{HEARTBEAT_MAX_INTERVAL} seconds (Flower's "
            f"SuperLink refuses a SuperNode announcing another interval), got {seconds:g}")
    return float(seconds)


def lost_after(seconds: float) -> float:
    """Seconds after its last heartbeat that the SuperLink declares a node with this interval lost."""
    return HEARTBEAT_PATIENCE * seconds


def set_heartbeat_interval(seconds: float) -> None:
    """Make this process's Flower SuperNode announce, and keep, `seconds` as its heartbeat
    interval. RuntimeError if this flwr no longer has what is set here."""
    import importlib

    seconds = check_heartbeat_interval(seconds)
    for name in HEARTBEAT_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, HEARTBEAT_NAME):
            raise RuntimeError(f"{name}.{HEARTBEAT_NAME} is gone from this flwr: {SUPERNODE_PROG} cannot set "
                               "the heartbeat interval; use flower-supernode")
        setattr(module, HEARTBEAT_NAME, seconds)


def supernode_parser() -> argparse.ArgumentParser:
    p = launcher_parser(SUPERNODE_PROG, "flower-supernode", "a heartbeat interval")
    p.add_argument(HEARTBEAT_OPTION, type=float, metavar="SECONDS", default=None,
                   help=f"the interval this SuperNode announces ({HEARTBEAT_MIN_INTERVAL}..{HEARTBEAT_MAX_INTERVAL}, "
                        f"Flower's default 30): the SuperLink declares it lost {HEARTBEAT_PATIENCE} x "
                        "SECONDS after its last heartbeat")
    return p


def _apply_heartbeat(seconds: float) -> str:
    set_heartbeat_interval(seconds)
    return (f"heartbeat interval {seconds:g} s: the SuperLink declares this node lost "
            f"{lost_after(seconds):g} s after its last heartbeat")


def _flower_supernode() -> None:
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


def supernode_main(argv: list[str] | None = None) -> int:
    return run_flower(supernode_parser(), argv, "flower-supernode", _flower_supernode, _apply_heartbeat)


SUPERLINK_PROG = "fl-merge-superlink"
BUSY_TIMEOUT_OPTION = "--sqlite-busy-timeout"
PRAGMAS_MODULE = "flwr.supercore.sql_mixin"
PRAGMAS_NAME = "SQLITE_PRAGMAS"


def check_busy_timeout(seconds: float) -> float:
    """The timeout if it is a positive number of seconds (sqlite takes whole milliseconds,
    at most 2^31 - 1); ValueError naming what is wrong if not."""
    if not 0.001 <= seconds <= (2**31 - 1) / 1000:
        raise ValueError(f"{BUSY_TIMEOUT_OPTION} must be a positive number of seconds (e.g. 60), got {seconds:g}")
    return float(seconds)


def pragmas_with_busy_timeout(pragmas: tuple[tuple[str, str], ...], seconds: float) -> tuple[tuple[str, str], ...]:
    """`pragmas` with busy_timeout set to `seconds` (in milliseconds, as sqlite takes it)."""
    ms = str(round(check_busy_timeout(seconds) * 1000))
    kept = tuple((k, v) for k, v in pragmas if k != "busy_timeout")
    return (("busy_timeout", ms), *kept)  # first: it then applies to journal_mode=WAL too


def set_busy_timeout(seconds: float) -> None:
    """Make this process's Flower SQL state wait up to `seconds` for sqlite's write lock.
    RuntimeError if this flwr no longer has what is set here."""
    import importlib

    module = importlib.import_module(PRAGMAS_MODULE)
    if not hasattr(module, PRAGMAS_NAME):
        raise RuntimeError(f"{PRAGMAS_MODULE}.{PRAGMAS_NAME} is gone from this flwr: {SUPERLINK_PROG} cannot set the "
                           "busy timeout; use flower-superlink")
    setattr(module, PRAGMAS_NAME, pragmas_with_busy_timeout(getattr(module, PRAGMAS_NAME), seconds))


def superlink_parser() -> argparse.ArgumentParser:
    p = launcher_parser(SUPERLINK_PROG, "flower-superlink", "sqlite's busy timeout (for --database FILE)")
    p.add_argument(BUSY_TIMEOUT_OPTION, type=float, metavar="SECONDS", default=None,
                   help="how long a write to the SuperLink's database waits for sqlite's write lock "
                        "before failing with 'database is locked' (Flower's: 5)")
    return p


def _apply_busy_timeout(seconds: float) -> str:
    set_busy_timeout(seconds)
    return f"sqlite busy timeout {seconds:g} s"


def _flower_superlink() -> None:
    from flwr.superlink.cli import flower_superlink

    flower_superlink()


def superlink_main(argv: list[str] | None = None) -> int:
    return run_flower(superlink_parser(), argv, "flower-superlink", _flower_superlink, _apply_busy_timeout)


def launcher_parser(prog: str, flower_cmd: str, what: str) -> argparse.ArgumentParser:
    """The parser of a launcher whose one option sets `what`; its other arguments are Flower's."""
    return argparse.ArgumentParser(
        prog=prog, add_help=False,
        description=f"{flower_cmd} with {what} of your choice; every other argument goes to "
                    f"{flower_cmd} unchanged.")


def run_flower(ours: argparse.ArgumentParser, argv: list[str] | None, flower_cmd: str,
               flower_main: Callable[[], object], apply: Callable[[float], str]) -> int:
    """Parse our one option out of `argv` (the rest is Flower's), `apply` it when given (a
    ValueError is one line and exit 2, before Flower starts; what it returns is logged), then
    run Flower's command with the rest."""
    args, rest = ours.parse_known_args(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(rest):
        ours.print_help()
        print(f"\n{flower_cmd}'s own options follow.\n")
    (value,) = vars(args).values()
    if value is not None:
        try:
            note = apply(value)
        except ValueError as e:
            ours.error(str(e))
        print(f"{ours.prog}: {note}", file=sys.stderr, flush=True)
    sys.argv = [flower_cmd, *rest]
    flower_main()
    return 0


if __name__ == "__main__":  # python -m fl_merge.deploy.launchers {supernode,superlink} ...
    _mains = {"supernode": supernode_main, "superlink": superlink_main}
    if len(sys.argv) < 2 or sys.argv[1] not in _mains:
        print("usage: python -m fl_merge.deploy.launchers {supernode,superlink} [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(_mains[sys.argv[1]](sys.argv[2:]))
