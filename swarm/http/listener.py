"""Serving the peer's aiohttp application on the addresses it was told to use.

``HttpServer`` binds one TCP port on each address (``--interface``; ``0.0.0.0`` on a real
device that listens everywhere). With port 0 the first bind picks a free port and the
others reuse it, so a peer announces one port for all its addresses. Binding is done
here rather than by aiohttp so that "port in use" becomes a ``ConfigError`` with a clear
message before the peer announces anything.

With ``lean=True`` (the peer's default) each socket is served by ``swarm.http.front``: the
peer-to-peer POSTs are answered on its lean path, every other request by the same aiohttp
application, to which the front hands the connection over.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Sequence
from typing import Final

from aiohttp import web

from swarm import config
from swarm.errors import ConfigError
from swarm.http.api import PEER_CALLS
from swarm.http.front import Front
from swarm.log import get_logger
from swarm.resource import AsyncResource

log = get_logger(__name__)

_BACKLOG: Final = 128  # as aiohttp's sites


class HttpServer(AsyncResource):
    """Serves an app on one port of each of ``hosts``; ``port`` 0 picks a free one."""

    def __init__(
        self,
        app: web.Application,
        *,
        hosts: Sequence[str],
        port: int,
        timings: config.Timings = config.DEFAULT_TIMINGS,
        lean: bool = True,
    ) -> None:
        if not hosts:
            raise ConfigError("the HTTP server needs at least one address to listen on")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {port}")
        self._hosts = list(hosts)
        self._requested_port = port
        self._port: int | None = None
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=timings.http_shutdown_s
        )
        self._timings = timings
        # The lean front needs the app's peer-to-peer routes; an app without them (not
        # a peer's) is served by aiohttp alone.
        self._lean = lean and PEER_CALLS in app
        self._app = app
        self.front: Front | None = None
        self._servers: list[asyncio.Server] = []
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<HttpServer hosts={self._hosts} port={self._port} closed={self._closed}>"

    @property
    def runner(self) -> web.AppRunner:
        """The aiohttp runner of the app (it serves whatever the lean front does not)."""
        return self._runner

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
        if self._lean:
            assert self._runner.server is not None
            self.front = Front(
                self._app[PEER_CALLS],
                self._runner.server,
                body_timeout_s=self._timings.body_read_timeout_s,
            )
        try:
            port = self._requested_port
            for host in self._hosts:
                sock = _bind(host, port)
                port = sock.getsockname()[1]
                try:
                    if self.front is not None:
                        server = await asyncio.get_running_loop().create_server(
                            self.front, sock=sock, backlog=_BACKLOG
                        )
                        self._servers.append(server)
                    else:
                        await web.SockSite(self._runner, sock).start()
                except BaseException:
                    sock.close()
                    raise
            self._port = port
        except BaseException:
            await self.aclose()
            raise
        log.info("http_listening", hosts=self._hosts, port=self._port, lean=self._lean)

    async def aclose(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), close; idempotent."""
        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            server.close()  # no new connections
        if self.front is not None:
            await self.front.shutdown(self._timings.http_shutdown_s)
        await self._runner.cleanup()  # the connections handed over to aiohttp
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
