"""Serving the peer's aiohttp application on the addresses it was told to use.

``HttpServer`` binds one TCP port on each address (``--interface``; ``0.0.0.0`` on a real
device that listens everywhere). With port 0 the first bind picks a free port and the
others reuse it, so a peer announces one port for all its addresses. Binding is done
here rather than by aiohttp so that "port in use" becomes a ``ConfigError`` with a clear
message before the peer announces anything.

Each accepted connection is counted, in all and per remote address: past a cap
(``config.MAX_CONNECTIONS``, ``MAX_CONNECTIONS_PER_ADDRESS``) it is answered 503 and
closed at once, with a log line, so a flood of connections costs a peer a bounded amount
of memory while it keeps serving those it holds. An idle keep-alive connection is closed
after ``Timings.keepalive_s``.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket
from collections.abc import Callable, Sequence
from typing import Any, Final

from aiohttp import web

from swarm import config
from swarm.errors import ConfigError
from swarm.log import get_logger
from swarm.resource import AsyncResource

log = get_logger(__name__)

_BACKLOG: Final = 128  # as aiohttp's sites
_REFUSAL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_REFUSAL_BODY: Final = (
    b'{"error": "too_many_connections", "message": "this peer holds as many connections '
    b'as it takes; retry later or ask another peer"}'
)


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted; refused past the caps."""

    def __init__(self, caps: ConnectionCaps, inner: asyncio.Protocol) -> None:
        self._caps = caps
        self._inner = inner
        self._remote: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        remote = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if not self._caps.admit(remote):
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_REFUSAL % (config.RETRY_AFTER_S, len(_REFUSAL_BODY), _REFUSAL_BODY))
            transport.close()
            return
        self._remote = remote
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._remote is None:
            return
        self._caps.release(self._remote)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._remote is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._remote is not None else None

    def pause_writing(self) -> None:
        if self._remote is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._remote is not None:
            self._inner.resume_writing()


class ConnectionCaps:
    """Open connections in all and per remote address, within their caps."""

    def __init__(self, *, total: int, per_address: int) -> None:
        if total < 1 or per_address < 1:
            raise ConfigError("connection caps must be >= 1")
        self._total = total
        self._per_address = per_address
        self._open: collections.Counter[str] = collections.Counter()
        self.count = 0
        self.refused = 0

    def admit(self, remote: str) -> bool:
        if self.count >= self._total or self._open[remote] >= self._per_address:
            self.refused += 1
            log.info(
                "connection_refused", remote=remote, open=self.count, from_remote=self._open[remote]
            )
            return False
        self.count += 1
        self._open[remote] += 1
        return True

    def release(self, remote: str) -> None:
        self.count -= 1
        self._open[remote] -= 1
        if not self._open[remote]:
            del self._open[remote]

    def wrap(self, factory: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory that counts what ``factory`` serves."""
        return lambda: _Counted(self, factory())


class HttpServer(AsyncResource):
    """Serves an app on one port of each of ``hosts``; ``port`` 0 picks a free one."""

    def __init__(
        self,
        app: web.Application,
        *,
        hosts: Sequence[str],
        port: int,
        timings: config.Timings = config.DEFAULT_TIMINGS,
        max_connections: int = config.MAX_CONNECTIONS,
        max_connections_per_address: int = config.MAX_CONNECTIONS_PER_ADDRESS,
    ) -> None:
        if not hosts:
            raise ConfigError("the HTTP server needs at least one address to listen on")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {port}")
        self._hosts = list(hosts)
        self._requested_port = port
        self._port: int | None = None
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=timings.http_shutdown_s,
            keepalive_timeout=timings.keepalive_s,
        )
        self.caps = ConnectionCaps(total=max_connections, per_address=max_connections_per_address)
        self._servers: list[asyncio.Server] = []
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<HttpServer hosts={self._hosts} port={self._port} closed={self._closed}>"

    @property
    def port(self) -> int:
        """The port actually bound (known once started)."""
        if self._port is None:
            raise ConfigError("the HTTP server is not started")
        return self._port

    async def start(self) -> None:
        """Bind every host (the same port on each) and start serving."""
        if self._closed:
            raise ConfigError("the HTTP server is closed")
        if self._started:
            return
        self._started = True
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        factory = self.caps.wrap(server)
        try:
            port = self._requested_port
            for host in self._hosts:
                sock = _bind(host, port)
                port = sock.getsockname()[1]
                try:
                    self._servers.append(
                        await asyncio.get_running_loop().create_server(
                            factory, sock=sock, backlog=_BACKLOG
                        )
                    )
                except BaseException:
                    sock.close()
                    raise
            self._port = port
        except BaseException:
            await self.aclose()
            raise
        log.info("http_listening", hosts=self._hosts, port=self._port)

    async def aclose(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), close; idempotent."""
        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            server.close()  # no new connections
        await self._runner.cleanup()
        for server in self._servers:
            await server.wait_closed()
        log.info("http_closed")


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Lets a restarted peer reuse its port past TIME_WAIT; a live listener on the
        # port still makes bind() fail on Linux.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} is already in use on {host}: stop the other process, "
                "or pass another --port (0 picks a free one)"
            ) from exc
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock
