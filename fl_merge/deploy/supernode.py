"""`fl-merge-supernode`: Flower's `flower-supernode` with the heartbeat interval as a setting.

How soon a lost SuperNode is noticed is the SuperNode's own choice in flwr 1.41: it announces
an interval when it activates and in every heartbeat (`heartbeat_interval` of
ActivateNodeRequest / SendNodeHeartbeatRequest), sends a heartbeat every
(interval - 5 s) x 0.8 +- 0.1, and the SuperLink declares it lost HEARTBEAT_PATIENCE (2) x the
interval it announced after its last heartbeat (linkstate `acknowledge_node_heartbeat`). The
SuperLink refuses an interval outside HEARTBEAT_MIN_INTERVAL..HEARTBEAT_MAX_INTERVAL
(10..1800 s, `fleet_handlers._validate_heartbeat_interval`: the node then fails to activate).
flwr 1.41 has no option, environment variable or config key for it: the interval is the
constant HEARTBEAT_DEFAULT_INTERVAL (30 s), read by the SuperNode's fleet connection and by
the heartbeat sender. `set_heartbeat_interval` sets those two module globals, in this one
place, before Flower's SuperNode starts; tests/engine/test_heartbeat.py fails if flwr renames
or stops reading them. Nothing else changes: the SuperNode's SuperExec and ClientApps are
processes of their own with Flower's defaults.
"""

from __future__ import annotations

import argparse
import sys

from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL, HEARTBEAT_PATIENCE

PROG = "fl-merge-supernode"
OPTION = "--heartbeat-interval"
# Where flwr 1.41 reads the interval a SuperNode announces and paces its heartbeats by.
PATCHED = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
PATCHED_NAME = "HEARTBEAT_DEFAULT_INTERVAL"


def check_heartbeat_interval(seconds: float) -> float:
    """The interval, if Flower's SuperLink accepts it; ValueError naming the range if not
    (a shorter one is refused by the SuperLink, never clamped)."""
    if not HEARTBEAT_MIN_INTERVAL <= seconds <= HEARTBEAT_MAX_INTERVAL:
        raise ValueError(
            f"{OPTION} must be {HEARTBEAT_MIN_INTERVAL}..{HEARTBEAT_MAX_INTERVAL} seconds (Flower's "
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
    for name in PATCHED:
        module = importlib.import_module(name)
        if not hasattr(module, PATCHED_NAME):
            raise RuntimeError(f"{name}.{PATCHED_NAME} is gone from this flwr: {PROG} cannot set "
                               "the heartbeat interval; use flower-supernode")
        setattr(module, PATCHED_NAME, seconds)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, add_help=False,
        description="flower-supernode with a heartbeat interval of your choice; every other "
                    "argument goes to flower-supernode unchanged.")
    p.add_argument(OPTION, type=float, metavar="SECONDS", default=None,
                   help=f"the interval this SuperNode announces ({HEARTBEAT_MIN_INTERVAL}..{HEARTBEAT_MAX_INTERVAL}, "
                        f"Flower's default 30): the SuperLink declares it lost {HEARTBEAT_PATIENCE} x "
                        "SECONDS after its last heartbeat")
    return p


def main(argv: list[str] | None = None) -> int:
    ours = parser()
    args, rest = ours.parse_known_args(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(rest):
        ours.print_help()
        print("\nflower-supernode's own options follow.\n")
    if args.heartbeat_interval is not None:
        try:
            check_heartbeat_interval(args.heartbeat_interval)
        except ValueError as e:
            ours.error(str(e))  # one line, exit 2, before Flower starts
        set_heartbeat_interval(args.heartbeat_interval)
        print(f"{PROG}: heartbeat interval {args.heartbeat_interval:g} s: the SuperLink declares this "
              f"node lost {lost_after(args.heartbeat_interval):g} s after its last heartbeat",
              file=sys.stderr, flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
