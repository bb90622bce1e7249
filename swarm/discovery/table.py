"""Who is in the swarm: the announcement each peer makes, and the table of live peers.

A peer's ``Announcement`` travels in the TXT record of its DNS-SD service: protocol
version, swarm, peer id, public key, role, and for a serving peer its family, variant,
model hash, MACs and accuracy.
``parse_announcement`` checks one from the network, and the ``PeerTable`` keeps only
records of our protocol version and swarm whose peer id is bound to their key.

The table also remembers how each peer behaved: failures back it off exponentially, and
after ``Timings.suspect_after_failures`` in a row it is suspected and hidden until it
answers again or re-announces.

``swarm.discovery.mdns`` feeds the table from mDNS.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import ipaddress
import math
import re
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal

from swarm import PROTOCOL_VERSION, config
from swarm.crypto.identity import peer_id_for
from swarm.errors import ConfigError, DecodeError, DiscoveryTimeoutError, VerificationError
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
K_VARIANT, K_SHA, K_MACS, K_ACC, K_FAMILY = "variant", "sha256", "macs", "acc", "family"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_PEER_ID = re.compile(r"[0-9a-f]{20}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FAMILY = re.compile(r"[0-9a-f]{32}")
_KEY_BYTES: Final = 32  # raw Ed25519 public key
_MAX_MACS: Final = 10**15
_DETAIL_CHARS: Final = 200  # peer-supplied text quoted in a log line is cut to this


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
    family: str = ""  # the family id of a serving peer's models (Manifest.family_id)
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
                K_FAMILY: self.family,
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
        (a.peer_id == peer_id_for(a.public_key), "peer id is not sha256(public key)[:20]"),
        (1 <= a.port <= 65535, "port must be in 1..65535"),
        (0 <= a.macs <= _MAX_MACS, "macs out of range"),
        (math.isfinite(a.accuracy) and 0.0 <= a.accuracy <= 1.0, "accuracy must be in [0, 1]"),
    ]
    if a.role == "peer":
        checks += [
            (bool(_NAME.fullmatch(a.variant)), "variant must be 1-63 of [A-Za-z0-9._-]"),
            (bool(_SHA256.fullmatch(a.model_sha256)), "model sha256 must be 64 hex digits"),
            (bool(_FAMILY.fullmatch(a.family)), "family must be 32 hex digits"),
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
        if len(key) == _KEY_BYTES and peer_id != peer_id_for(key):
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
            family=text(K_FAMILY) if serving else "",
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
    family: str = ""  # its models' family id (a serving peer's)

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
            family=ann.family,
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
