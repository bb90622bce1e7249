"""Private network namespaces: each simulated device is a host of its own on a private bridge.

A ``Lab`` creates one hub namespace holding a Linux bridge and, per host, a namespace with
an ``eth0`` whose veth peer is attached to that bridge. Nothing is created in the machine's
own namespace: both ends of every veth are created directly inside the lab's namespaces,
so the lab cannot reach, or be reached from, any real interface. Multicast (mDNS) crosses
the bridge because snooping is off (``mcast_snooping 0``), so peers discover each other as
they would on a real LAN.

Addresses come from 198.18.0.0/15, the block RFC 2544 reserves for benchmarking networks;
each lab has its own hub, so concurrent labs may reuse them without meeting.

Partitions move hosts' bridge ports onto separate bridges; ``heal`` puts them back.
Needs root and iproute2 (``ip``); ``available()`` says whether this machine can.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

SUBNET = ipaddress.ip_network("198.18.0.0/24")
PREFIX = "vsw"  # every namespace a lab creates starts with this (for stale clean-up)
IP_TIMEOUT_S = 10.0


class NetnsError(RuntimeError):
    """A namespace operation failed; the message carries the command and its error."""


def available() -> tuple[bool, str]:
    """Whether labs can be created here, and if not, why (for skip reasons)."""
    if shutil.which("ip") is None:
        return False, "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    probe = f"{PREFIX}probe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except NetnsError as exc:
        return False, f"cannot create a network namespace: {exc}"
    with contextlib.suppress(NetnsError):
        _ip("netns", "del", probe)
    return True, ""


def _ip(*args: str) -> str:
    cmd = ["ip", *args]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(cmd)}: {exc}") from exc
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of existing namespaces that start with ``prefix``."""
    out = _ip("netns", "list")
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def kill_namespace_processes(ns: str, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(NetnsError):
        for pid in _ip("netns", "pids", ns).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)


def delete_namespace(ns: str) -> None:
    kill_namespace_processes(ns)
    with contextlib.suppress(NetnsError):
        _ip("netns", "del", ns)


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace left by an earlier lab (a crashed run); returns their names."""
    stale = namespaces(prefix)
    for ns in stale:
        delete_namespace(ns)
    return stale


@dataclass(frozen=True)
class Host:
    name: str  # the simulator's name for it, e.g. "peer3"
    netns: str  # the namespace's name
    ip: str
    port: str  # the veth end on the hub's bridge

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it inside this host."""
        return ["ip", "netns", "exec", self.netns]


@dataclass
class Lab:
    """A private LAN of namespaced hosts; a context manager that removes all it made."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    _next: int = 1
    _bridges: list[str] = field(default_factory=lambda: ["br0"])
    _made: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.tag}hub"

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        try:
            _ip("netns", "add", self.hub)
            self._made.append(self.hub)
            _ip("-n", self.hub, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
        except NetnsError:
            self.close()
            raise

    def add_host(self, name: str) -> Host:
        """A new namespace with eth0 on the lab's bridge and the next free address."""
        if name in self.hosts:
            raise NetnsError(f"host {name!r} exists already in lab {self.tag}")
        index = self._next
        self._next += 1
        if index >= SUBNET.num_addresses - 1:
            raise NetnsError(f"lab {self.tag} is full ({index - 1} hosts)")
        ns = f"{PREFIX}{self.tag}h{index}"
        port = f"p{index}"
        ip = str(SUBNET.network_address + index)
        _ip("netns", "add", ns)
        self._made.append(ns)
        try:
            # Both ends are created inside the lab's namespaces: nothing touches the
            # machine's own network namespace, not even for a moment.
            _ip(
                "link",
                "add",
                "eth0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.hub,
            )
            _ip("-n", self.hub, "link", "set", port, "master", "br0")
            _ip("-n", self.hub, "link", "set", port, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{ip}/{SUBNET.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        except NetnsError:
            delete_namespace(ns)
            raise
        host = Host(name=name, netns=ns, ip=ip, port=port)
        self.hosts[name] = host
        return host

    def remove_host(self, name: str) -> None:
        host = self.hosts.pop(name)
        delete_namespace(host.netns)
        with contextlib.suppress(ValueError):
            self._made.remove(host.netns)

    def set_link(self, name: str, up: bool) -> None:
        """Cut or restore one host's cable (its bridge port)."""
        _ip("-n", self.hub, "link", "set", self.hosts[name].port, "up" if up else "down")

    def partition(self, groups: Sequence[Sequence[str]]) -> None:
        """Split the LAN: each group of hosts gets a bridge of its own."""
        self.heal()
        for i, group in enumerate(groups):
            bridge = f"br{i}"
            if bridge not in self._bridges:
                _ip("-n", self.hub, "link", "add", bridge, "type", "bridge", "mcast_snooping", "0")
                _ip("-n", self.hub, "link", "set", bridge, "up")
                self._bridges.append(bridge)
            for name in group:
                _ip("-n", self.hub, "link", "set", self.hosts[name].port, "master", bridge)

    def heal(self) -> None:
        """Every host back on one bridge."""
        for host in self.hosts.values():
            _ip("-n", self.hub, "link", "set", host.port, "master", "br0")

    def processes(self) -> Iterator[tuple[str, int]]:
        for host in self.hosts.values():
            with contextlib.suppress(NetnsError):
                for pid in _ip("netns", "pids", host.netns).split():
                    yield host.name, int(pid)

    def close(self) -> None:
        """Kill what runs in the lab's namespaces and delete them; safe to call twice."""
        for ns in reversed(self._made):
            delete_namespace(ns)
        self._made.clear()
        self.hosts.clear()


def attach(tag: str, hosts: dict[str, Host]) -> Lab:
    """A handle on a running lab made by another process (for ``python -m sim.faults``).

    Closing it would delete that lab: use it for ``partition`` and ``heal`` only.
    """
    lab = Lab(tag=tag, hosts=dict(hosts))
    out = _ip("-n", lab.hub, "-o", "link", "show", "type", "bridge")
    lab._bridges = [line.split(":")[1].strip() for line in out.splitlines() if ":" in line]
    return lab


__all__ = [
    "SUBNET",
    "Host",
    "Lab",
    "NetnsError",
    "attach",
    "available",
    "cleanup_stale",
    "namespaces",
]
