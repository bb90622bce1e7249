"""Links over aiohttp WebSockets: ``GET /v1/link``, binary messages only.

The requester's side (``WebSocketTransport``) opens one WebSocket per peer on first use
and keeps it; the peer's side (``LinkServer``) serves each one with ``serve_link``.
WebSocket pings (``Timings.link_heartbeat_s``) find a peer or requester that vanished.
A peer refuses a link past its caps (in all, and per remote address) with 503 and a log
line; a link that stays silent for ``Timings.link_idle_s`` is closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Final

import aiohttp
from aiohttp import web
from yarl import URL

from swarm import config
from swarm.crypto.identity import Identity, TrustStore
from swarm.crypto.session import TAG_LEN, HelloGuard
from swarm.discovery.table import PeerRecord
from swarm.errors import ConfigError, DecodeError, PeerTimeoutError, PeerUnreachableError
from swarm.link.answer import Answerer
from swarm.link.transport import ClientLink, LinkConfig, LinkPool, open_link, serve_link
from swarm.log import get_logger
from swarm.metrics import Metrics
from swarm.wire import codec

log = get_logger(__name__)

LINK_PATH: Final = "/v1/link"
_CLOSE_TIMEOUT_S: Final = 1.0
# RFC 6455 section 7.4.2: 4000-4999 are for applications; 1008 is "policy violation".
_POLICY_VIOLATION: Final = 1008
_MAX_CLOSE_REASON: Final = 120  # a close frame's reason must fit in 123 bytes


class WsPipe:
    """A ``Pipe`` over an aiohttp WebSocket (either end)."""

    __slots__ = ("_ws",)

    def __init__(self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send_bytes(data)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise PeerUnreachableError(f"the link is gone: {exc}") from exc

    async def receive(self) -> bytes:
        try:
            msg = await self._ws.receive()
        except TimeoutError:
            raise PeerTimeoutError("the link was silent for too long") from None
        if msg.type is aiohttp.WSMsgType.BINARY:
            return msg.data  # type: ignore[no-any-return]
        if msg.type is aiohttp.WSMsgType.ERROR:
            raise DecodeError(f"the link's WebSocket failed: {msg.data}")
        if msg.type is aiohttp.WSMsgType.TEXT:
            raise DecodeError("a text message on a link (only binary messages are allowed)")
        raise PeerUnreachableError(f"the link was closed ({msg.extra or 'no reason given'})")

    async def close(self, reason: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await self._ws.close(
                code=_POLICY_VIOLATION, message=reason.encode()[:_MAX_CLOSE_REASON]
            )


class WebSocketTransport(LinkPool):
    """The requester's links to peers, over aiohttp WebSockets."""

    def __init__(
        self,
        link_config: LinkConfig,
        *,
        timings: config.Timings = config.DEFAULT_TIMINGS,
    ) -> None:
        super().__init__(open_timeout_s=timings.connect_timeout_s + timings.link_handshake_s)
        self._config = link_config
        self._timings = timings
        self._session: aiohttp.ClientSession | None = None
        self._good: dict[str, str] = {}  # peer id -> the address that last worked

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=config.REQUESTER_MAX_CONNECTIONS),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._timings.connect_timeout_s
                ),
            )
        return self._session

    async def connect(self, record: PeerRecord) -> ClientLink:
        session = self._client()
        preferred = self._good.get(record.peer_id)
        addresses = sorted(record.addresses, key=lambda a: a != preferred)
        last: Exception | None = None
        for address in addresses:
            url = URL.build(scheme="http", host=address, port=record.port, path=LINK_PATH)
            try:
                # TCP connect is bounded by the session (connect_timeout_s); the upgrade,
                # a round trip through the peer's HTTP server, as the handshake is.
                async with asyncio.timeout(self._timings.link_handshake_s):
                    ws = await session.ws_connect(
                        url,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_CLOSE_TIMEOUT_S),
                        heartbeat=self._timings.link_heartbeat_s,
                        max_msg_size=codec.MAX_ANSWERS + TAG_LEN,
                        compress=0,
                    )
            except aiohttp.WSServerHandshakeError as exc:
                raise PeerUnreachableError(
                    f"{address}:{record.port} refused the link: HTTP {exc.status} {exc.message}"
                ) from exc
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = exc  # this address does not reach the peer; try the next one
                continue
            link = await open_link(
                WsPipe(ws), self._config, record, timeout_s=self._timings.link_handshake_s
            )
            self._good[record.peer_id] = address
            return link
        raise PeerUnreachableError(
            f"cannot reach {record.peer_id} at {addresses} port {record.port}: {last!r}"
        )

    async def healthy(self, record: PeerRecord) -> bool:
        """Whether ``record``'s peer answers ``GET /healthz`` on one of its addresses."""
        session = self._client()
        for address in record.addresses:
            url = URL.build(scheme="http", host=address, port=record.port, path="/healthz")
            try:
                async with (
                    asyncio.timeout(self._timings.connect_timeout_s),
                    session.get(url) as resp,
                ):
                    if resp.status == 200:
                        return True
            except (TimeoutError, aiohttp.ClientError, OSError):
                continue
        return False

    async def aclose(self) -> None:
        await super().aclose()
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class LinkServer:
    """A peer's ``GET /v1/link``: each WebSocket is a link served by ``serve_link``."""

    def __init__(
        self,
        guard: HelloGuard,
        answerer: Answerer,
        *,
        timings: config.Timings = config.DEFAULT_TIMINGS,
        metrics: Metrics | None = None,
        max_asks: int = config.MAX_LINK_ASKS,
        max_links: int = config.MAX_LINKS,
        max_links_per_address: int = config.MAX_LINKS_PER_ADDRESS,
    ) -> None:
        if min(max_asks, max_links, max_links_per_address) < 1:
            raise ConfigError("link caps must be >= 1")
        self.guard = guard
        self.answerer = answerer
        self._timings = timings
        self._metrics = metrics
        self._max_asks = max_asks
        self._max_links = max_links
        self._max_per_address = max_links_per_address
        self._links: collections.Counter[str] = collections.Counter()

    @classmethod
    def build(
        cls,
        identity: Identity,
        answerer: Answerer,
        *,
        trust: TrustStore,
        timings: config.Timings = config.DEFAULT_TIMINGS,
        metrics: Metrics | None = None,
    ) -> LinkServer:
        """The link server of a peer that answers with ``answerer``."""
        guard = HelloGuard(
            identity,
            swarm=answerer.swarm,
            family=answerer.family,
            trust=trust,
            freshness_s=timings.freshness_s,
            max_asks=config.MAX_LINK_ASKS,
        )
        return cls(guard, answerer, timings=timings, metrics=metrics)

    def __repr__(self) -> str:
        return f"<LinkServer links={self.links}>"

    @property
    def links(self) -> int:
        return sum(self._links.values())

    def mount(self, app: web.Application) -> None:
        app.router.add_get(LINK_PATH, self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        remote = request.remote or "unknown"
        if self.links >= self._max_links or self._links[remote] >= self._max_per_address:
            log.info("link_refused", remote=remote, reason="too_many_links", open=self.links)
            if self._metrics is not None:
                self._metrics.observe_rejection("too_many_links")
            return web.json_response(
                {
                    "error": "too_many_links",
                    "message": f"this peer holds {self.links} links ({self._links[remote]} from "
                    f"{remote}); retry after {config.RETRY_AFTER_S} s or ask another peer",
                },
                status=503,
                headers={"Retry-After": str(config.RETRY_AFTER_S)},
            )
        ws = web.WebSocketResponse(
            timeout=_CLOSE_TIMEOUT_S,
            receive_timeout=self._timings.link_idle_s,
            heartbeat=self._timings.link_heartbeat_s,
            max_msg_size=codec.max_asks_size(self.answerer.input_len) + TAG_LEN,
            compress=False,
        )
        await ws.prepare(request)
        self._links[remote] += 1
        try:
            await serve_link(
                WsPipe(ws),
                self.guard,
                self.answerer,
                max_asks=self._max_asks,
                handshake_timeout_s=self._timings.link_handshake_s,
                remote=remote,
            )
        finally:
            self._links[remote] -= 1
            if not self._links[remote]:
                del self._links[remote]
            await ws.close()
        return ws
