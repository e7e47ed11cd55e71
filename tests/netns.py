"""Several "hosts" on one machine for tests: one Linux network namespace per host, each with
one veth link to a bridge that lives in a hub namespace of its own, on a private subnet.

Nothing is created in the machine's own namespace (no interface, no route, no address), so
the hosts reach each other and nothing else; two test sessions never collide because every
name carries the creating process id. `network()` deletes every namespace (and with it every
veth, bridge and qdisc) on exit, also on failure or Ctrl-C; namespaces left by a process that
died without cleaning up (SIGKILL) are removed by the next `network()`.

    with network(["link", "node0", "node1"]) as net:
        net.popen("node0", ["flower-supernode", ...])      # runs inside node0's namespace
        net.ip("link")                                      # "10.213.0.1"
        net.cut("node0")                                    # its link down: nothing in or out
        net.throttle("node1")                               # every packet waits ~tens of s

Needs root and iproute2 (`ip netns`); `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SUBNET = "10.213.0"  # /24, inside the namespaces only; the hosts get .1, .2, ...
PREFIX = "flm"  # namespace names: flm<pid>-<host>
_NAME = re.compile(rf"^{PREFIX}(\d+)-")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can): not root, no iproute2, or
    the kernel refuses a namespace."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale() -> list[str]:
    """Delete the namespaces of ours whose creating process is gone; returns their names."""
    gone = []
    for ns in namespaces():
        m = _NAME.match(ns)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _ip("netns", "del", ns, check=False)
            gone.append(ns)
    return gone


class Network:
    """Hosts on one bridge. Host i (in the order given) has address SUBNET.(i+1)/24 on its
    interface `eth0`; `lo` is up too (local services bind 127.0.0.1 inside the host)."""

    def __init__(self, hosts: Sequence[str]) -> None:
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError(f"host names must be distinct and at least one, got {list(hosts)}")
        self.tag = f"{PREFIX}{os.getpid()}"
        self.hosts = list(hosts)
        self.hub = f"{self.tag}-hub"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def ip(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        self._add_ns(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            ns, port = self.ns(host), f"p{i}"
            self._add_ns(ns)
            # both ends are created directly in their namespaces: nothing in the host's own
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.hub)
            _ip("-n", self.hub, "link", "set", port, "master", "br0")
            _ip("-n", self.hub, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def pids(self) -> list[int]:
        """The processes still running inside any of this network's namespaces."""
        out = []
        for name in self.made:
            out += [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
        return out

    def left_after(self, seconds: float) -> dict[int, str]:
        """The processes still inside the network after waiting up to `seconds` for them to
        end, each with its command line. Flower's detached children (the SuperExec, its
        ServerApp, an orphaned ClientApp) end on their own once their parent is gone, but
        only after their parent monitor notices (every 0.2 s) and their SIGINT handler
        finishes: seconds, not instantly."""
        deadline = time.monotonic() + seconds
        while (pids := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        out = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        return out

    def destroy(self) -> None:
        """Delete every namespace made (their veths, the bridge and any qdisc go with them).
        A process still inside one (started there by this test, so ours) is killed first: a
        namespace with a live process is only unlisted, not gone."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in reversed(self.made):
            _ip("netns", "del", name, check=False)
        self.made = [n for n in self.made if n in namespaces()]

    def popen(self, host: str, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        """`cmd` inside `host`'s namespace (`ip netns exec` execs it: the pid is the command's)."""
        return subprocess.Popen([*self.exec_prefix(host), *cmd], **kwargs)

    def run(self, host: str, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*self.exec_prefix(host), *cmd], **kwargs)

    def cut(self, host: str) -> None:
        """Take the host's link down: from now on nothing goes in or out (as a pulled cable)."""
        _ip("-n", self.ns(host), "link", "set", "eth0", "down")

    def throttle(self, host: str, rate: str = "1kbit", latency: str = "100s") -> None:
        """Make the host's outgoing link so slow that it looks alive but delays everything:
        a token bucket (tc tbf) at `rate`, packets queued up to `latency` before being dropped.
        At 1 kbit/s a full 1500-byte packet leaves ~12 s after the one before it. (tc netem
        `delay` would do the same more directly, but not every kernel has sch_netem; this
        test machine's has not.)"""
        subprocess.run([*self.exec_prefix(host), "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                        "rate", rate, "burst", "1600", "latency", latency],
                       capture_output=True, text=True, timeout=30, check=True)

    def qdiscs(self, host: str) -> str:
        return self.run(host, ["tc", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True,
                        timeout=30, check=True).stdout


@contextlib.contextmanager
def network(hosts: Sequence[str]) -> Iterator[Network]:
    """A Network of `hosts`, deleted on exit whatever happens (exceptions, KeyboardInterrupt).
    Stop the processes started in it before leaving (`pids()` says what is left); whatever
    is still running inside is killed on the way out."""
    remove_stale()
    net = Network(hosts)
    try:
        net.build()
        yield net
    finally:
        net.destroy()
