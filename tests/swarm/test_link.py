"""Tests of swarm.link: the protocol on in-memory pipes, and the WebSocket link for real.

The in-memory pipes run the very protocol peers speak (handshake, sealing, codec,
``serve_link``), so the link's behaviour is pinned here without sockets; the WebSocket
tests then check the same over aiohttp on 127.0.0.1, with the peer's caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from structlog.testing import capture_logs

from swarm import config
from swarm.config import Timings
from swarm.crypto.identity import Identity, TrustStore
from swarm.crypto.session import HelloGuard, Offer
from swarm.discovery.table import PeerRecord, PeerTable
from swarm.errors import PeerUnreachableError, VerificationError
from swarm.http.api import ServerContext, create_app
from swarm.http.listener import HttpServer
from swarm.inference.manifest import Manifest, ModelSpec
from swarm.link.answer import Answerer
from swarm.link.memory import MemoryNetwork, MemoryPeer, MemoryPipe, pipe_pair
from swarm.link.transport import OVERLOADED, LinkConfig, open_link, serve_link
from swarm.link.websocket import LINK_PATH, LinkServer, WebSocketTransport
from swarm.metrics import Metrics
from swarm.wire import codec, verify
from swarm.wire.messages import Ask, Asks, InferReply, InferRequest, ItemError, build_request
from tests.swarm.signed import FAMILY, MODEL_SHA

SWARM = "lab"
SHAPE = config.INPUT_SHAPE


class Result:
    def __init__(self, probs: np.ndarray[Any, Any]) -> None:
        self.probs = probs
        self.seconds = 0.0001


class Model:
    """Answers class ``label``; holds each input until ``gate`` is set when it has one."""

    def __init__(self, label: int = 3) -> None:
        self.spec = ModelSpec(
            name="V1",
            role="variant",
            file=Path("/nonexistent.onnx"),
            sha256=MODEL_SHA,
            params=1,
            macs=1,
            resolution=28,
            width=0.25,
            val_accuracy=0.9,
            test_accuracy=0.9,
            latency_ms=0.1,
        )
        self.label = label
        self.gate: asyncio.Event | None = None
        self.hold: dict[int, asyncio.Event] = {}  # first pixel value -> what it waits for
        self.calls = 0

    async def infer(self, x: Any) -> Result:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        held = self.hold.get(round(float(x.flat[0]) * 255))
        if held is not None:
            await held.wait()
        probs = np.full(10, 0.02, np.float32)
        probs[self.label] = 0.82
        return Result(probs)


def record_of(peer: Identity, port: int = 1) -> PeerRecord:
    return PeerRecord(
        peer.peer_id, peer.public_key, "V1", MODEL_SHA, 1, 0.9, "peer", ("127.0.0.1",),
        port, 0.0, 0.0,
    )  # fmt: skip


def request_of(requester: Identity, value: int = 0) -> InferRequest:
    return build_request(
        swarm=SWARM,
        family=FAMILY,
        requester_id=requester.peer_id,
        tensor=np.full(SHAPE, value, np.uint8),
        deadline_ms=2000,
    )


def answerer_of(peer: Identity, model: Model | None = None) -> Answerer:
    return Answerer(peer, model or Model(), swarm=SWARM, family=FAMILY, input_shape=SHAPE)


def guard_of(peer: Identity, max_asks: int = 64) -> HelloGuard:
    return HelloGuard(
        peer, swarm=SWARM, family=FAMILY, trust=TrustStore.open(), freshness_s=30, max_asks=max_asks
    )


class Pair:
    """A requester and one in-memory peer."""

    def __init__(self, max_asks: int = 64) -> None:
        self.requester = Identity.generate()
        self.peer = Identity.generate()
        self.model = Model()
        self.network = MemoryNetwork()
        self.network.add(
            MemoryPeer(guard_of(self.peer, max_asks), answerer_of(self.peer, self.model), max_asks)
        )
        self.transport = self.network.transport(LinkConfig(self.requester, SWARM, FAMILY))
        self.record = record_of(self.peer)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    yield p
    await p.transport.aclose()
    await p.network.aclose()


# --- the protocol, in memory --------------------------------------------------------------


async def test_an_exchange_brings_signed_replies_bound_to_the_asks(pair: Pair) -> None:
    """A group of asks comes back as the peer's replies, in order, under its signature."""
    requests = [request_of(pair.requester, v) for v in (0, 50, 200)]
    link = await pair.transport.link(pair.record)
    batch = await link.exchange(requests)
    verify.verify_reply_batch(batch, expected_key=pair.peer.public_key)
    for req, reply in zip(requests, batch.items, strict=True):
        assert isinstance(reply, InferReply)
        verify.verify_reply(
            reply,
            request=req,
            expected_peer_id=pair.peer.peer_id,
            expected_key=pair.peer.public_key,
            trust=TrustStore.open(),
            now_ms=reply.issued_at_ms,
            freshness_s=30,
        )
        assert reply.topk[0] == (3, 820_000)


async def test_a_link_is_opened_once_and_kept(pair: Pair) -> None:
    """Later exchanges reuse the link; concurrent first callers share one handshake."""
    links = await asyncio.gather(*(pair.transport.link(pair.record) for _ in range(5)))
    assert len({id(link) for link in links}) == 1
    await links[0].exchange([request_of(pair.requester)])
    assert await pair.transport.link(pair.record) is links[0]
    assert len(pair.network.peers[pair.peer.peer_id].guard) == 1  # one hello accepted


async def test_many_exchanges_in_flight_are_matched_by_number(pair: Pair) -> None:
    """Answers that come back out of order reach the exchange they answer."""
    link = await pair.transport.link(pair.record)
    gate = asyncio.Event()
    pair.model.hold = {1: gate}
    first_request = request_of(pair.requester, 1)
    first = asyncio.ensure_future(link.exchange([first_request]))
    second_request = request_of(pair.requester, 2)
    second = await link.exchange([second_request])  # answered while the first waits
    assert not first.done()
    gate.set()
    answered = await first
    assert [i.request_id for i in second.items] == [second_request.request_id]
    assert [i.request_id for i in answered.items] == [first_request.request_id]


async def test_asks_past_the_links_cap_are_refused_item_by_item() -> None:
    """Past max_asks in flight the peer answers "overloaded" at once and keeps the link."""
    p = Pair(max_asks=2)
    try:
        link = await p.transport.link(p.record)
        link._max_asks = 10  # the requester's own check would stop it first
        p.model.gate = asyncio.Event()
        held = asyncio.ensure_future(link.exchange([request_of(p.requester, i) for i in (1, 2)]))
        await asyncio.sleep(0.01)
        refused = await link.exchange([request_of(p.requester, 3)])
        assert isinstance(refused.items[0], ItemError)
        assert refused.items[0].error == OVERLOADED
        p.model.gate.set()
        served = await held
        assert all(isinstance(i, InferReply) for i in served.items)
        assert not link.closed
    finally:
        await p.transport.aclose()
        await p.network.aclose()


class Tap:
    """A pipe between two pipes that can alter what the requester sends."""

    def __init__(self) -> None:
        self.client, inner = pipe_pair()
        self.server, self._outer = pipe_pair()
        self._inner = inner
        self.alter: Any = None
        self.sent: list[bytes] = []
        self._tasks = [
            asyncio.ensure_future(self._pump(self._inner, self._outer, True)),
            asyncio.ensure_future(self._pump(self._outer, self._inner, False)),
        ]

    async def _pump(self, src: MemoryPipe, dst: MemoryPipe, upstream: bool) -> None:
        try:
            while True:
                data = await src.receive()
                if upstream:
                    self.sent.append(data)
                    if self.alter is not None:
                        data = self.alter(data)
                await dst.send(data)
        except PeerUnreachableError:
            await dst.close("gone")

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def tapped() -> AsyncIterator[tuple[Tap, Any, Pair, asyncio.Task[None]]]:
    p = Pair()
    tap = Tap()
    server = asyncio.ensure_future(
        serve_link(
            tap.server,
            p.network.peers[p.peer.peer_id].guard,
            p.network.peers[p.peer.peer_id].answerer,
            max_asks=64,
            handshake_timeout_s=1.0,
            remote="test",
        )
    )
    link = await open_link(
        tap.client, LinkConfig(p.requester, SWARM, FAMILY), p.record, timeout_s=1.0
    )
    try:
        yield tap, link, p, server
    finally:
        await link.aclose()
        await asyncio.wait_for(server, 2)
        await tap.aclose()


@pytest.mark.parametrize("fault", ["tampered", "replayed", "garbage"])
async def test_an_altered_message_ends_the_link_with_one_logged_line(fault: str) -> None:
    """A tampered, replayed or garbage message ends its link: one log line, the pending
    exchange fails, nothing else is touched."""
    async with tapped() as (tap, link, p, server):
        await link.exchange([request_of(p.requester)])
        if fault == "tampered":
            tap.alter = lambda data: data[:-1] + bytes([data[-1] ^ 1])
        elif fault == "replayed":
            tap.alter = lambda data: tap.sent[1]  # the first sealed asks, again
        else:
            tap.alter = lambda data: b"\x00" * len(data)
        with capture_logs() as logs, pytest.raises(PeerUnreachableError):
            await asyncio.wait_for(link.exchange([request_of(p.requester)]), 2)
        await asyncio.wait_for(server, 2)
        broken = [e for e in logs if e["event"] == "link_broken"]
        assert len(broken) == 1
        assert "did not open" in broken[0]["reason"]
        assert link.closed


async def test_a_message_before_the_handshake_is_refused() -> None:
    """A peer refuses a link whose first message is not a hello, and logs why."""
    p = Pair()
    client, server_end = pipe_pair()
    guard = p.network.peers[p.peer.peer_id].guard
    answerer = p.network.peers[p.peer.peer_id].answerer
    serving = asyncio.ensure_future(
        serve_link(server_end, guard, answerer, max_asks=8, handshake_timeout_s=1, remote="x")
    )
    with capture_logs() as logs:
        await client.send(codec.encode_asks(Asks(0, (Ask("0" * 32, 2, 10, b"\x00" * 784),))))
        await asyncio.wait_for(serving, 2)
    refused = [e for e in logs if e["event"] == "link_refused"]
    assert refused and refused[0]["reason"] == "malformed"
    with pytest.raises(PeerUnreachableError):
        await client.receive()
    assert answerer.model.calls == 0  # type: ignore[attr-defined]


async def test_a_silent_link_is_dropped_after_the_handshake_timeout() -> None:
    """No hello within the timeout: the peer closes the link."""
    p = Pair()
    client, server_end = pipe_pair()
    peer = p.network.peers[p.peer.peer_id]
    with capture_logs() as logs:
        await asyncio.wait_for(
            serve_link(
                server_end, peer.guard, peer.answerer, max_asks=8, handshake_timeout_s=0.05,
                remote="x",
            ),
            2,
        )  # fmt: skip
    assert [e["reason"] for e in logs if e["event"] == "link_refused"] == ["no hello in time"]
    del client


async def test_a_replayed_hello_opens_no_second_link() -> None:
    """The same hello on a second pipe is refused (it opened a link already)."""
    p = Pair()
    peer = p.network.peers[p.peer.peer_id]
    offer = Offer(p.requester, swarm=SWARM, family=FAMILY)
    for expect_welcome in (True, False):
        client, server_end = pipe_pair()
        serving = asyncio.ensure_future(
            serve_link(server_end, peer.guard, peer.answerer, max_asks=8,
                       handshake_timeout_s=1, remote="x")
        )  # fmt: skip
        await client.send(codec.encode_handshake(offer.hello))
        if expect_welcome:
            assert codec.decode_welcome(await client.receive()).requester_id == p.requester.peer_id
            await client.close("done")
        else:
            with pytest.raises(PeerUnreachableError):
                await client.receive()
        await asyncio.wait_for(serving, 2)


async def test_a_link_to_an_impostor_is_refused() -> None:
    """The requester refuses a welcome not signed by the key the peer announced."""
    p = Pair()
    impostor = Identity.generate()
    p.network.peers[p.peer.peer_id] = MemoryPeer(guard_of(impostor), answerer_of(impostor))
    try:
        with pytest.raises(VerificationError) as info:
            await p.transport.link(p.record)
        assert info.value.reason == verify.WRONG_KEY
    finally:
        await p.transport.aclose()
        await p.network.aclose()


async def test_a_broken_link_is_replaced_on_the_next_ask(pair: Pair) -> None:
    """After its link breaks, the next ask to the peer opens a new one."""
    link = await pair.transport.link(pair.record)
    await link.aclose()
    again = await pair.transport.link(pair.record)
    assert again is not link
    assert isinstance((await again.exchange([request_of(pair.requester)])).items[0], InferReply)


async def test_an_unreachable_peer_is_a_transport_error(pair: Pair) -> None:
    """A peer that cannot be reached raises PeerUnreachableError, not a bare exception."""
    pair.network.peers[pair.peer.peer_id].reachable = False
    with pytest.raises(PeerUnreachableError):
        await pair.transport.link(pair.record)
    assert not await pair.transport.healthy(pair.record)


# --- over WebSockets ------------------------------------------------------------------------


class WsPeer:
    """A peer's HTTP server with its link server, on 127.0.0.1."""

    def __init__(self, *, max_connections_per_address: int = 32, **link_caps: Any) -> None:
        self.identity = Identity.generate()
        self.model = Model()
        self.metrics = Metrics()
        self.links = LinkServer(
            guard_of(self.identity),
            answerer_of(self.identity, self.model),
            timings=TIMINGS,
            metrics=self.metrics,
            **link_caps,
        )
        ctx = ServerContext(
            identity=self.identity,
            swarm=SWARM,
            links=self.links,
            model=self.model,
            manifest=Manifest(Path("/nonexistent"), tuple("abcdefghij"), (self.model.spec,)),
            table=PeerTable(SWARM),
            metrics=self.metrics,
            timings=TIMINGS,
        )
        self.server = HttpServer(
            create_app(ctx),
            hosts=["127.0.0.1"],
            port=0,
            timings=TIMINGS,
            max_connections_per_address=max_connections_per_address,
        )

    @property
    def record(self) -> PeerRecord:
        return record_of(self.identity, self.server.port)


TIMINGS = Timings(link_handshake_s=1.0, link_heartbeat_s=5.0, connect_timeout_s=1.0)


@pytest.fixture
async def ws_peer() -> AsyncIterator[WsPeer]:
    peer = WsPeer()
    async with peer.server:
        yield peer


def ws_transport(requester: Identity) -> WebSocketTransport:
    return WebSocketTransport(LinkConfig(requester, SWARM, FAMILY), timings=TIMINGS)


async def test_an_exchange_over_a_real_websocket(ws_peer: WsPeer, requester: Identity) -> None:
    """The same protocol over aiohttp on 127.0.0.1: signed, bound replies."""
    transport = ws_transport(requester)
    try:
        link = await transport.link(ws_peer.record)
        requests = [request_of(requester, v) for v in range(4)]
        batch = await link.exchange(requests)
        verify.verify_reply_batch(batch, expected_key=ws_peer.identity.public_key)
        assert [i.request_id for i in batch.items] == [r.request_id for r in requests]
        assert await transport.healthy(ws_peer.record)
    finally:
        await transport.aclose()


async def test_links_past_the_per_address_cap_are_refused_with_503(requester: Identity) -> None:
    """A peer holding its cap of links from one address refuses the next with 503, logged,
    and keeps serving the links it holds."""
    peer = WsPeer(max_links_per_address=1)
    async with peer.server:
        first, second = ws_transport(requester), ws_transport(Identity.generate())
        try:
            link = await first.link(peer.record)
            with capture_logs() as logs, pytest.raises(PeerUnreachableError, match="503"):
                await second.link(peer.record)
            assert any(e.get("reason") == "too_many_links" for e in logs)
            assert isinstance((await link.exchange([request_of(requester)])).items[0], InferReply)
        finally:
            await first.aclose()
            await second.aclose()


async def test_text_and_oversized_messages_end_the_link(
    ws_peer: WsPeer, requester: Identity
) -> None:
    """Only binary messages within the family's bound are taken; others end the link."""
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{ws_peer.server.port}{LINK_PATH}"
        for send in ("text", "big"):
            async with session.ws_connect(url) as ws:
                if send == "text":
                    await ws.send_str("hello?")
                else:
                    await ws.send_bytes(b"\x00" * (codec.max_asks_size(784) + 1024))
                msg = await asyncio.wait_for(ws.receive(), 2)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws_peer.links.links == 0
    assert ws_peer.model.calls == 0


async def test_connections_past_the_cap_get_503_and_the_rest_are_served(
    requester: Identity,
) -> None:
    """Past its connection cap per address a peer answers 503 and closes; it keeps serving."""
    peer = WsPeer(max_connections_per_address=2)
    async with peer.server:
        held = [socket.create_connection(("127.0.0.1", peer.server.port)) for _ in range(2)]
        try:
            await asyncio.sleep(0.05)
            extra = socket.create_connection(("127.0.0.1", peer.server.port))
            extra.settimeout(2)
            answer = await asyncio.get_running_loop().run_in_executor(None, extra.recv, 4096)
            extra.close()
            assert answer.startswith(b"HTTP/1.1 503")
            assert b"too_many_connections" in answer
            assert peer.server.caps.refused == 1
        finally:
            for sock in held:
                sock.close()
        await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{peer.server.port}/healthz"
            async with session.get(url) as resp:
                assert resp.status == 200
