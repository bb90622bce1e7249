"""Peer discovery over mDNS/DNS-SD (RFC 6762, RFC 6763) and the live peer table.

Every peer registers one DNS-SD service of type ``_vswarm._tcp.local.`` named by its peer
id; the SRV record carries its HTTP port and the TXT record an ``Announcement``: protocol
version, swarm, peer id, public key, variant, model hash, MACs, accuracy, role. A browser
resolves each announced service and offers it to the ``PeerTable``, which keeps only
records of our protocol version and swarm whose peer id is bound to their key.

The table also remembers how each peer behaved: failures back it off exponentially, and
after ``Timings.suspect_after_failures`` in a row it is suspected and hidden until it
answers again or re-announces.

Network safety: ``Discovery`` takes its interfaces explicitly. Tests and the simulator
pass ``["127.0.0.1"]``; only a real device passes ``ALL_INTERFACES``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import enum
import functools
import hashlib
import ipaddress
import math
import re
import socket
import time
import types
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Final, Literal, Self

import zeroconf
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from swarm import PROTOCOL_VERSION, config
from swarm.errors import (
    ConfigError,
    DecodeError,
    DiscoveryTimeoutError,
    TransportError,
    VerificationError,
)
from swarm.log import get_logger

log = get_logger(__name__)

Role = Literal["peer", "requester"]
ROLES: Final = ("peer", "requester")
PeerEvent = Literal["added", "updated", "removed", "suspected", "recovered"]
PeerListener = Callable[[PeerEvent, "PeerRecord"], None]

# TXT keys. RFC 6763 section 6.4: keys should be no more than nine characters.
# "proto" plays the role of section 6.7's txtvers: a peer of another version is ignored
# before any other key is read, so a later version may change the rest freely.
K_PROTO, K_SWARM, K_ID, K_KEY, K_ROLE = "proto", "swarm", "id", "pk", "role"
K_VARIANT, K_SHA, K_MACS, K_ACC = "variant", "sha256", "macs", "acc"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_PEER_ID = re.compile(r"[0-9a-f]{20}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_BYTES: Final = 32  # raw Ed25519 public key
_MAX_MACS: Final = 10**15
_DETAIL_CHARS: Final = 200  # peer-supplied text quoted in a log line is cut to this


def _peer_id_for(public_key: bytes) -> str:
    # Same rule as swarm.identity.peer_id_for: the first 80 bits of sha256(raw key).
    return hashlib.sha256(public_key).hexdigest()[:20]


class AllInterfaces(enum.Enum):
    """Explicit opt-in to announce and browse on every interface (real devices only)."""

    ALL = "all"


ALL_INTERFACES: Final = AllInterfaces.ALL


@dataclasses.dataclass(frozen=True, slots=True)
class Announcement:
    """What a peer says about itself in its TXT record (the port goes in the SRV record)."""

    swarm: str
    peer_id: str
    public_key: bytes
    role: Role
    port: int
    variant: str = ""
    model_sha256: str = ""
    macs: int = 0
    accuracy: float = 0.0
    protocol: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise ConfigError(f"invalid announcement: {problem}")

    def txt(self) -> dict[str, str]:
        """The TXT key/value pairs (RFC 6763 section 6)."""
        pairs = {
            K_PROTO: str(self.protocol),
            K_SWARM: self.swarm,
            K_ID: self.peer_id,
            K_KEY: base64.b64encode(self.public_key).decode("ascii"),
            K_ROLE: self.role,
        }
        if self.role == "peer":
            pairs |= {
                K_VARIANT: self.variant,
                K_SHA: self.model_sha256,
                K_MACS: str(self.macs),
                K_ACC: repr(round(self.accuracy, 6)),
            }
        return pairs


def _problem(a: Announcement) -> str | None:
    checks = [
        (a.role in ROLES, f"role must be one of {ROLES}"),
        (bool(_NAME.fullmatch(a.swarm)), "swarm must be 1-63 of [A-Za-z0-9._-]"),
        (len(a.public_key) == _KEY_BYTES, f"public key must be {_KEY_BYTES} raw bytes"),
        (a.peer_id == _peer_id_for(a.public_key), "peer id is not sha256(public key)[:20]"),
        (1 <= a.port <= 65535, "port must be in 1..65535"),
        (0 <= a.macs <= _MAX_MACS, "macs out of range"),
        (math.isfinite(a.accuracy) and 0.0 <= a.accuracy <= 1.0, "accuracy must be in [0, 1]"),
    ]
    if a.role == "peer":
        checks += [
            (bool(_NAME.fullmatch(a.variant)), "variant must be 1-63 of [A-Za-z0-9._-]"),
            (bool(_SHA256.fullmatch(a.model_sha256)), "model sha256 must be 64 hex digits"),
        ]
    for ok, problem in checks:
        if not ok:
            return problem
    size = sum(len(k) + len(v) + 2 for k, v in a.txt().items())  # length byte + "="
    if size > config.MAX_TXT_RECORD:
        return f"TXT record is {size} bytes; RFC 6763 section 6.2 caps it at 1300"
    return None


def parse_announcement(
    properties: Mapping[bytes, bytes | None], *, port: int, swarm: str
) -> Announcement:
    """Check a TXT record from the network.

    Raises VerificationError with reason ``protocol_version``, ``other_swarm`` or
    ``peer_id_mismatch``, or DecodeError when the record is malformed.
    """

    def text(key: str) -> str:
        raw = properties.get(key.encode("ascii"))
        if raw is None:
            raise DecodeError(f"TXT key {key!r} is missing or has no value")
        if len(raw) > config.MAX_TXT_VALUE:
            raise DecodeError(f"TXT value of {key!r} is longer than {config.MAX_TXT_VALUE}")
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise DecodeError(f"TXT value of {key!r} is not ASCII") from None

    proto = text(K_PROTO)
    if proto != str(PROTOCOL_VERSION):
        raise VerificationError("protocol_version", f"peer speaks {proto[:16]!r}")
    if (their_swarm := text(K_SWARM)) != swarm:
        raise VerificationError("other_swarm", f"peer is in swarm {their_swarm[:64]!r}")
    role = text(K_ROLE)
    try:
        key = base64.b64decode(text(K_KEY), validate=True)
        peer_id = text(K_ID)
        if len(key) == _KEY_BYTES and peer_id != _peer_id_for(key):
            raise VerificationError("peer_id_mismatch", f"id {peer_id[:20]!r} is not bound to key")
        serving = role == "peer"
        return Announcement(
            swarm=swarm,
            peer_id=peer_id,
            public_key=key,
            role=role,  # type: ignore[arg-type]  # checked in __post_init__
            port=port,
            variant=text(K_VARIANT) if serving else "",
            model_sha256=text(K_SHA) if serving else "",
            macs=int(text(K_MACS)) if serving else 0,
            accuracy=float(text(K_ACC)) if serving else 0.0,
        )
    except (binascii.Error, ValueError, ConfigError) as exc:
        raise DecodeError(f"malformed TXT record: {exc}") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class PeerRecord:
    """A live peer as the table knows it (replaced, never mutated)."""

    peer_id: str
    public_key: bytes
    variant: str
    model_sha256: str
    macs: int
    accuracy: float
    role: Role
    addresses: tuple[str, ...]
    port: int
    first_seen: float
    last_seen: float
    failures: int = 0
    # candidates() skips the peer before this time: the end of its backoff, or
    # math.inf once it is suspected.
    suspected_until: float = 0.0

    @property
    def suspected(self) -> bool:
        return self.suspected_until == math.inf

    def usable(self, now: float) -> bool:
        """Serving, and neither backed off nor suspected at ``now``."""
        return self.role == "peer" and now >= self.suspected_until


class PeerTable:
    """The peers of one swarm seen on mDNS, with their failure history."""

    def __init__(
        self,
        swarm: str,
        *,
        timings: config.Timings = config.DEFAULT_TIMINGS,
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = config.MAX_PEERS,
    ) -> None:
        if not _NAME.fullmatch(swarm):
            raise ConfigError(f"swarm name {swarm!r} must be 1-63 of [A-Za-z0-9._-]")
        self.swarm = swarm
        self._timings = timings
        self._clock = clock
        self._max_peers = max_peers
        self._peers: dict[str, PeerRecord] = {}
        self._ignored: dict[str, str] = {}  # service name -> reason already logged
        self._listeners: list[PeerListener] = []
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<PeerTable swarm={self.swarm!r} peers={len(self._peers)}>"

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._peers.get(peer_id)

    def records(self) -> list[PeerRecord]:
        """Every record, requesters and suspected peers included, by peer id."""
        return sorted(self._peers.values(), key=lambda r: r.peer_id)

    def candidates(self, now: float | None = None) -> list[PeerRecord]:
        """Serving peers that are neither backed off nor suspected, by peer id."""
        at = self._clock() if now is None else now
        return [r for r in self.records() if r.usable(at)]

    def suspected(self) -> list[PeerRecord]:
        """Suspected peers: a caller may probe them and report_success when one answers."""
        return [r for r in self.records() if r.suspected]

    def variants(self, now: float | None = None) -> set[str]:
        """The variants that candidates serve."""
        return {r.variant for r in self.candidates(now)}

    @property
    def ignored(self) -> Mapping[str, str]:
        """Services ignored lately (service name -> reason token), for diagnostics."""
        return types.MappingProxyType(self._ignored)

    def add_listener(self, listener: PeerListener) -> Callable[[], None]:
        """Call ``listener(event, record)`` on every change; returns an unsubscribe."""
        self._listeners.append(listener)
        return functools.partial(self._listeners.remove, listener)

    async def wait_for(
        self,
        condition: int | Callable[[PeerTable], bool],
        timeout: float,  # noqa: ASYNC109  # always bounded; the error says what was seen
    ) -> None:
        """Wait until ``condition`` holds (an int: that many candidates), re-checked on
        every change of the table; DiscoveryTimeoutError after ``timeout`` seconds."""
        if isinstance(condition, bool) or (isinstance(condition, int) and condition < 0):
            raise ConfigError(f"wait_for needs a count >= 0 or a predicate, got {condition!r}")
        check = (
            functools.partial(_has_candidates, count=condition)
            if isinstance(condition, int)
            else condition
        )
        try:
            async with asyncio.timeout(timeout):
                while not check(self):
                    await self._changed.wait()
        except TimeoutError:
            raise DiscoveryTimeoutError(
                f"condition not met after {timeout} s on mDNS: {len(self)} peers, "
                f"variants {sorted(self.variants())}"
            ) from None

    # -- fed by the browser --

    def offer(
        self,
        service_name: str,
        properties: Mapping[bytes, bytes | None],
        addresses: Sequence[str],
        port: int,
    ) -> PeerRecord | None:
        """Add or update the peer behind a resolved service; None if it is ignored."""
        label = service_name.removesuffix("." + config.SERVICE_TYPE)
        try:
            ann, addrs = _accept(label, properties, addresses, port, self.swarm)
        except VerificationError as exc:
            self._ignore(service_name, label, exc.reason, exc.detail)
            return None
        except DecodeError as exc:
            self._ignore(service_name, label, "malformed_txt", str(exc))
            return None
        self._ignored.pop(service_name, None)
        now = self._clock()
        old = self._peers.get(ann.peer_id)
        if old is None and len(self._peers) >= self._max_peers and not self._evict_one():
            self._ignore(service_name, label, "table_full", f"{self._max_peers} peers")
            return None
        record = PeerRecord(
            peer_id=ann.peer_id,
            public_key=ann.public_key,
            variant=ann.variant,
            model_sha256=ann.model_sha256,
            macs=ann.macs,
            accuracy=ann.accuracy,
            role=ann.role,
            addresses=addrs,
            port=ann.port,
            first_seen=old.first_seen if old else now,
            last_seen=now,
        )  # a re-announcement clears the failure history
        self._peers[record.peer_id] = record
        log.info(
            "peer_seen" if old is None else "peer_updated",
            peer=record.peer_id,
            variant=record.variant,
            role=record.role,
            addresses=list(addrs),
            port=record.port,
        )
        self._notify("added" if old is None else "updated", record)
        return record

    def withdraw(self, service_name: str) -> PeerRecord | None:
        """Forget the peer behind a service that said goodbye or expired."""
        self._ignored.pop(service_name, None)
        record = self._peers.pop(service_name.removesuffix("." + config.SERVICE_TYPE), None)
        if record is not None:
            log.info("peer_gone", peer=record.peer_id)
            self._notify("removed", record)
        return record

    # -- fed by the requester --

    def report_failure(self, peer_id: str, now: float) -> PeerRecord | None:
        """Count a failed call; back the peer off, and suspect it after too many in a row."""
        old = self._peers.get(peer_id)
        if old is None:
            return None
        failures = old.failures + 1
        t = self._timings
        if failures >= t.suspect_after_failures:
            until = math.inf
        else:
            exponent = min(failures - 1, 60)  # keeps 2**n a finite float
            until = now + min(t.backoff_base_s * 2.0**exponent, t.backoff_max_s)
        record = dataclasses.replace(old, failures=failures, suspected_until=until)
        self._peers[peer_id] = record
        if record.suspected and not old.suspected:
            log.warning("peer_suspected", peer=peer_id, failures=failures)
            self._notify("suspected", record)
        else:
            log.debug("peer_backed_off", peer=peer_id, failures=failures, until=until)
            self._notify("updated", record)
        return record

    def report_success(self, peer_id: str) -> None:
        """A peer answered: clear its failures and any suspicion."""
        old = self._peers.get(peer_id)
        if old is None or (old.failures == 0 and old.suspected_until == 0.0):
            return
        record = dataclasses.replace(old, failures=0, suspected_until=0.0, last_seen=self._clock())
        self._peers[peer_id] = record
        if old.suspected:
            log.info("peer_recovered", peer=peer_id)
        self._notify("recovered" if old.suspected else "updated", record)

    # -- internals --

    def _ignore(self, service_name: str, label: str, reason: str, detail: str) -> None:
        if self._ignored.get(service_name) != reason:
            if len(self._ignored) >= self._max_peers:
                self._ignored.clear()  # bounded: a flood of names may repeat a line later
            self._ignored[service_name] = reason
            self._wake()
            log.info(
                "peer_ignored",
                service=service_name[:_DETAIL_CHARS],
                reason=reason,
                detail=detail[:_DETAIL_CHARS],
            )
        stale = self._peers.pop(label, None)  # a record that turned bad no longer counts
        if stale is not None:
            self._notify("removed", stale)

    def _evict_one(self) -> bool:
        suspects = self.suspected()
        if not suspects:
            return False
        victim = min(suspects, key=lambda r: r.last_seen)
        del self._peers[victim.peer_id]
        self._notify("removed", victim)
        return True

    def _wake(self) -> None:
        # Wake every waiter: they hold the old event, later waiters take the new one.
        self._changed.set()
        self._changed = asyncio.Event()

    def _notify(self, event: PeerEvent, record: PeerRecord) -> None:
        self._wake()
        for listener in list(self._listeners):
            try:
                listener(event, record)
            except Exception:
                # A listener (metrics, a UI) must never break discovery.
                log.exception("peer_listener_failed", listener_event=event, peer=record.peer_id)


def _has_candidates(table: PeerTable, count: int) -> bool:
    return len(table.candidates()) >= count


def _accept(
    label: str,
    properties: Mapping[bytes, bytes | None],
    addresses: Sequence[str],
    port: int,
    swarm: str,
) -> tuple[Announcement, tuple[str, ...]]:
    ann = parse_announcement(properties, port=port, swarm=swarm)
    if ann.peer_id != label:
        raise VerificationError("name_mismatch", "service name is not the peer id")
    return ann, _clean_addresses(addresses)


def _clean_addresses(addresses: Sequence[str]) -> tuple[str, ...]:
    clean: list[str] = []
    for text in addresses[: config.MAX_PEER_ADDRESSES]:
        try:
            addr = ipaddress.IPv4Address(text)
        except ValueError:
            continue
        if not (addr.is_multicast or addr.is_unspecified) and str(addr) not in clean:
            clean.append(str(addr))
    if not clean:
        raise DecodeError("the service has no usable IPv4 address")
    return tuple(clean)


class Discovery:
    """Registers this peer's service and browses the swarm's, feeding a PeerTable.

    ``interfaces`` is required: a list of IPv4 addresses (``["127.0.0.1"]`` in tests and
    the simulator) or ``ALL_INTERFACES`` on a real device.
    """

    def __init__(
        self,
        table: PeerTable,
        *,
        interfaces: Sequence[str] | AllInterfaces,
        timings: config.Timings = config.DEFAULT_TIMINGS,
    ) -> None:
        if not isinstance(interfaces, AllInterfaces):
            if isinstance(interfaces, str) or not interfaces:
                raise ConfigError("interfaces must be a non-empty list of IPv4 addresses")
            for ip in interfaces:
                try:
                    ipaddress.IPv4Address(ip)
                except ValueError:
                    raise ConfigError(f"interface {ip!r} is not an IPv4 address") from None
            interfaces = list(interfaces)
        self.table = table
        self._interfaces = interfaces
        self._timings = timings
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}  # service name -> newest resolve
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def __repr__(self) -> str:
        name = self._info.name if self._info else None
        return f"<Discovery interfaces={self._interfaces} registered={name} table={self.table}>"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the mDNS sockets on the chosen interfaces and start browsing."""
        if self._closed:
            raise ConfigError("discovery is closed")
        if self._zc is not None:
            return
        choice = (
            zeroconf.InterfaceChoice.All
            if isinstance(self._interfaces, AllInterfaces)
            else self._interfaces
        )
        try:
            self._zc = AsyncZeroconf(interfaces=choice, ip_version=IPVersion.V4Only)
            await self._zc.zeroconf.async_wait_for_start(
                timeout=self._timings.mdns_start_stop_timeout_s
            )
        except (OSError, zeroconf.Error) as exc:
            await self.aclose()
            raise TransportError(f"cannot start mDNS on {self._interfaces}: {exc!r}") from exc
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, config.SERVICE_TYPE, handlers=[self._on_service_state_change]
        )
        log.info("discovery_started", interfaces=str(self._interfaces), swarm=self.table.swarm)

    async def register(
        self, announcement: Announcement, addresses: Sequence[str] | None = None
    ) -> None:
        """Announce this peer (probing for a unique name first, RFC 6762 section 8)."""
        if self._info is not None:
            raise ConfigError("already registered: use update() to change the announcement")
        info = self._service_info(announcement, addresses)
        zc = self._running()
        try:
            async with asyncio.timeout(self._timings.mdns_register_timeout_s):
                await (await zc.async_register_service(info))
        except zeroconf.NonUniqueNameException:
            raise ConfigError(
                f"another service already announces {info.name}: two peers share one key"
            ) from None
        except (TimeoutError, OSError, zeroconf.Error) as exc:
            raise TransportError(f"mDNS registration of {info.name} failed: {exc!r}") from exc
        self._info = info
        log.info("discovery_registered", service=info.name, role=announcement.role)

    async def update(
        self, announcement: Announcement, addresses: Sequence[str] | None = None
    ) -> None:
        """Re-announce changed TXT or addresses under the same peer id."""
        if self._info is None:
            raise ConfigError("not registered: call register() first")
        info = self._service_info(announcement, addresses)
        if info.name != self._info.name:
            raise ConfigError("update() cannot change the peer id; unregister and register")
        zc = self._running()
        try:
            async with asyncio.timeout(self._timings.mdns_register_timeout_s):
                await (await zc.async_update_service(info))
        except (TimeoutError, OSError, zeroconf.Error) as exc:
            raise TransportError(f"mDNS update of {info.name} failed: {exc!r}") from exc
        self._info = info
        log.info("discovery_updated", service=info.name)

    async def unregister(self) -> None:
        """Say goodbye (TTL 0, RFC 6762 section 10.1) so peers drop us at once."""
        info, self._info = self._info, None
        if info is None or self._zc is None:
            return
        try:
            async with asyncio.timeout(self._timings.mdns_start_stop_timeout_s):
                await (await self._zc.async_unregister_service(info))
        except (TimeoutError, OSError, zeroconf.Error) as exc:
            log.warning("discovery_goodbye_failed", service=info.name, error=repr(exc))

    async def aclose(self) -> None:
        """Stop browsing, say goodbye, close the sockets; idempotent."""
        if self._closed:
            return
        self._closed = True
        zc = self._zc
        if zc is None:
            return
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
            tasks = set(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            await self.unregister()
        finally:
            self._zc = None
            try:
                async with asyncio.timeout(self._timings.mdns_start_stop_timeout_s):
                    await zc.async_close()
            except TimeoutError:
                log.warning("discovery_close_timeout")
            log.info("discovery_closed")

    # -- internals --

    def _running(self) -> AsyncZeroconf:
        if self._zc is None or self._closed:
            raise ConfigError("discovery is not running: use it as an async context manager")
        return self._zc

    def _service_info(
        self, announcement: Announcement, addresses: Sequence[str] | None
    ) -> AsyncServiceInfo:
        if announcement.swarm != self.table.swarm:
            raise ConfigError(
                f"announcement is for swarm {announcement.swarm!r}, the table for "
                f"{self.table.swarm!r}"
            )
        if addresses is None:
            addresses = (
                _all_ipv4_addresses()
                if isinstance(self._interfaces, AllInterfaces)
                else self._interfaces
            )
        try:
            packed = [socket.inet_aton(str(ipaddress.IPv4Address(a))) for a in addresses]
        except ValueError:
            raise ConfigError(f"addresses must be IPv4 addresses, got {addresses!r}") from None
        name = f"{announcement.peer_id}.{config.SERVICE_TYPE}"
        return AsyncServiceInfo(
            config.SERVICE_TYPE,
            name,
            addresses=packed,
            port=announcement.port,
            properties=announcement.txt(),
            server=f"vswarm-{announcement.peer_id}.local.",
        )

    def _on_service_state_change(
        self, *, name: str, state_change: ServiceStateChange, **_: object
    ) -> None:
        # Runs inside zeroconf's dispatch: never block it, resolve in a task.
        if self._closed:
            return
        if state_change is ServiceStateChange.Removed:
            if (pending := self._resolving.pop(name, None)) is not None:
                pending.cancel()
            self.table.withdraw(name)
            return
        if name not in self._resolving and len(self._resolving) >= config.MAX_PENDING_RESOLVES:
            log.debug("resolve_dropped", service=name[:_DETAIL_CHARS])
            return
        if (pending := self._resolving.pop(name, None)) is not None:
            pending.cancel()  # the newest announcement wins
        task = asyncio.create_task(self._resolve(name), name="vswarm-resolve")
        self._resolving[name] = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._resolve_done, name))

    async def _resolve(self, name: str) -> None:
        zc = self._zc
        if zc is None:
            return
        info = AsyncServiceInfo(config.SERVICE_TYPE, name)
        timeout_ms = self._timings.mdns_resolve_timeout_s * 1000
        try:
            found = await info.async_request(zc.zeroconf, timeout_ms)
        except (OSError, zeroconf.Error) as exc:
            log.debug("resolve_failed", service=name[:_DETAIL_CHARS], error=repr(exc))
            return
        if not found:
            log.debug("resolve_timeout", service=name[:_DETAIL_CHARS])
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        self.table.offer(name, info.properties, addresses, info.port or 0)

    def _resolve_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._resolving.get(name) is task:
            del self._resolving[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("resolve_crashed", service=name[:_DETAIL_CHARS], exc_info=exc)


def _all_ipv4_addresses() -> list[str]:
    import ifaddr  # noqa: PLC0415  # zeroconf's own dependency; only real devices need it

    found = {
        str(ip.ip)
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str) and not ipaddress.IPv4Address(ip.ip).is_loopback
    }
    if not found:
        raise ConfigError("no non-loopback IPv4 address to announce; pass addresses explicitly")
    return sorted(found)
