"""Peer discovery over mDNS/DNS-SD (RFC 6762, RFC 6763).

Every peer registers one DNS-SD service of type ``_vswarm._tcp.local.`` named by its peer
id; the SRV record carries its HTTP port and the TXT record an ``Announcement``. A
browser resolves each announced service and offers it to the ``PeerTable``. The
announcement format and the table live in ``swarm.discovery.table`` and are re-exported here.

Network safety: ``Discovery`` takes its interfaces explicitly. Tests and the simulator
pass ``["127.0.0.1"]``; only a real device passes ``ALL_INTERFACES``.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import socket
from collections.abc import Sequence
from typing import Final

import zeroconf
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from swarm import config
from swarm.discovery.table import (
    _DETAIL_CHARS,
    Announcement,
    PeerTable,
)
from swarm.errors import ConfigError, TransportError
from swarm.log import get_logger
from swarm.resource import AsyncResource

__all__ = ["ALL_INTERFACES", "AllInterfaces", "Discovery"]

log = get_logger(__name__)


class AllInterfaces(enum.Enum):
    """Explicit opt-in to announce and browse on every interface (real devices only)."""

    ALL = "all"


ALL_INTERFACES: Final = AllInterfaces.ALL


class Discovery(AsyncResource):
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
