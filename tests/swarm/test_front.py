"""Tests of swarm.http.front: the lean HTTP path of the peer-to-peer POSTs, over raw sockets.

``test_server`` runs every route's contract through the front as well as through aiohttp;
what is pinned here is what only a connection shows: pipelining, the hand-over to
aiohttp between two requests, keep-alive and ``Connection: close``, the time limits,
a client that leaves, shutdown, and heads the front must not answer itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm import config
from swarm.config import Timings
from swarm.crypto.identity import Identity, TrustStore
from swarm.discovery.mdns import PeerTable
from swarm.http.api import ServerContext, create_app
from swarm.http.listener import HttpServer
from swarm.inference.engine import Engine, FloatArray, InferenceResult, Manifest, ModelSpec
from swarm.metrics import Metrics
from swarm.wire import codec as wire

SWARM = "front-swarm"
READ_S = 5.0  # the longest any test waits for an answer
HEAD = "POST /v1/infer HTTP/1.1\r\nHost: p\r\n"


class StuckModel:
    """A model that never answers; records when its caller gives up."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()

    async def infer(self, x: FloatArray) -> InferenceResult:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return InferenceResult(np.full(config.NUM_CLASSES, 0.1, dtype=np.float32), 0.001, 1)


@pytest.fixture
async def engine(tiny_manifest: Manifest) -> AsyncIterator[Engine]:
    async with Engine(tiny_manifest.get("T1")) as eng:
        yield eng


class Peer:
    """A served app and a requester identity to build request bodies with."""

    def __init__(self, server: HttpServer, metrics: Metrics) -> None:
        self.server = server
        self.metrics = metrics
        self.requester = Identity.generate()

    @property
    def front(self) -> Any:
        assert self.server.front is not None
        return self.server.front

    def infer_body(self, **kw: Any) -> bytes:
        tensor = np.random.default_rng(0).random(config.INPUT_SHAPE, dtype=np.float32)
        req = wire.build_request(self.requester, swarm=SWARM, tensor=tensor, deadline_ms=2000, **kw)
        return wire.encode_request(req)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.server.port)


@contextlib.asynccontextmanager
async def serve(
    tiny_manifest: Manifest,
    model: Any,
    timings: Timings = config.DEFAULT_TIMINGS,
    *,
    lean: bool = True,
) -> AsyncIterator[Peer]:
    metrics = Metrics()
    ctx = ServerContext(
        identity=Identity.generate(),
        swarm=SWARM,
        trust=TrustStore.open(),
        model=model,
        manifest=tiny_manifest,
        table=PeerTable(SWARM),
        metrics=metrics,
        timings=timings,
    )
    app = create_app(ctx)
    async with HttpServer(app, hosts=["127.0.0.1"], port=0, timings=timings, lean=lean) as http:
        yield Peer(http, metrics)


@pytest.fixture
async def peer(tiny_manifest: Manifest, engine: Engine) -> AsyncIterator[Peer]:
    async with serve(tiny_manifest, engine) as p:
        yield p


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: peer", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length body: status, headers, body."""
    async with asyncio.timeout(READ_S):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(READ_S):
        return await reader.read() == b""


async def test_pipelined_requests_are_answered_in_order(peer: Peer) -> None:
    """Requests sent back to back on one connection are answered in order, by the front."""
    reader, writer = await peer.connect()
    bodies = [peer.infer_body() for _ in range(3)]
    writer.write(b"".join(post("/v1/infer", b) for b in bodies))
    ids = [json.loads(b)["request_id"] for b in bodies]
    for request_id in ids:
        status, headers, body = await read_answer(reader)
        assert status == 200, body
        assert headers["content-type"] == "application/json; charset=utf-8"
        assert wire.decode_reply(body).request_id == request_id
    assert peer.front.handed_over == 0
    await close(writer)


async def test_other_requests_hand_the_connection_to_aiohttp(peer: Peer) -> None:
    """A GET after a peer POST on the same connection is answered by aiohttp, which keeps
    the connection: a later POST on it is answered there too."""
    reader, writer = await peer.connect()
    writer.write(post("/v1/infer", peer.infer_body()))
    assert (await read_answer(reader))[0] == 200
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: peer\r\n\r\n")
    status, headers, body = await read_answer(reader)
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    assert "aiohttp" in headers["server"]
    writer.write(post("/v1/infer", peer.infer_body()))
    status, headers, body = await read_answer(reader)
    assert status == 200
    assert "aiohttp" in headers["server"]
    assert wire.decode_reply(body).variant == "T1"
    assert peer.front.handed_over == 1
    await close(writer)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # chunked bodies, 100-continue and queries are aiohttp's to serve
        (f"{HEAD}Transfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n0\r\n\r\n", 400),
        ("POST /v1/infer?x=1 HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\n\r\n{", 400),
        # a declared body over the route's limit: aiohttp's route says the limit
        (f"{HEAD}Content-Length: {config.MAX_INFER_BODY + 1}\r\n\r\n", 413),
        # malformed heads: aiohttp's parser says what is wrong
        ("POST /v1/infer HTTP/1.1\r\nHost: p\r\nno colon here\r\n\r\n", 400),
        ("POST /v1/infer HTTP/1.1\r\nHost: p\r\nContent-Length: \u00b2\r\n\r\n", 400),
        (
            "POST /v1/infer HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n{",
            400,
        ),
        ("GET /v1/infer HTTP/1.1\r\nHost: p\r\n\r\n", 405),
        # HTTP/1.1 without Host: aiohttp refuses it, so the front does not serve it
        ("POST /v1/infer HTTP/1.1\r\nContent-Length: 1\r\n\r\n{", 400),
    ],
)
async def test_requests_the_front_does_not_serve_get_aiohttp_answers(
    peer: Peer, head: str, status: int
) -> None:
    """Whatever the lean path does not take is answered by aiohttp, as without the front."""
    reader, writer = await peer.connect()
    writer.write(head.encode("latin-1"))
    got, _, body = await read_answer(reader)
    assert got == status, body
    assert peer.front.handed_over == 1
    await close(writer)


async def test_head_over_the_limit_is_handed_over(peer: Peer) -> None:
    """A head longer than the front reads is aiohttp's to refuse."""
    reader, writer = await peer.connect()
    writer.write(b"POST /v1/infer HTTP/1.1\r\nHost: p\r\nX-Pad: " + b"a" * 10_000 + b"\r\n\r\n")
    assert (await read_answer(reader))[0] in (400, 431)
    assert peer.front.handed_over == 1
    await close(writer)


async def test_connection_close_is_honoured(peer: Peer) -> None:
    """``Connection: close``: the answer says so, then the front closes the connection."""
    reader, writer = await peer.connect()
    writer.write(post("/v1/infer", peer.infer_body(), "Connection: close"))
    status, headers, _ = await read_answer(reader)
    assert status == 200
    assert headers["connection"] == "close"
    assert await closed_by_server(reader)
    await close(writer)


async def test_errors_on_the_lean_path_are_json_and_keep_the_connection(peer: Peer) -> None:
    """A refused request gets the JSON error; the connection serves the next one."""
    reader, writer = await peer.connect()
    writer.write(post("/v1/infer", b"{not json"))
    status, _, body = await read_answer(reader)
    assert status == 400
    assert json.loads(body)["error"] == "malformed_request"
    writer.write(post("/v1/infer", peer.infer_body()))
    assert (await read_answer(reader))[0] == 200
    assert peer.front.handed_over == 0
    text = peer.metrics.registry.get_sample_value(
        "vswarm_requests_total", {"endpoint": "/v1/infer", "status": "400"}
    )
    assert text == 1.0
    await close(writer)


async def test_slow_body_is_408_and_slow_head_is_closed(tiny_manifest: Manifest) -> None:
    """A body that stops arriving gets 408 and a close; a head that stops, a close."""
    model = StuckModel(tiny_manifest.get("T1"))
    async with serve(tiny_manifest, model, Timings(body_read_timeout_s=0.05)) as peer:
        reader, writer = await peer.connect()
        writer.write(b"POST /v1/infer HTTP/1.1\r\nHost: p\r\nContent-Length: 100\r\n\r\n{")
        status, headers, body = await read_answer(reader)
        assert status == 408
        assert json.loads(body)["error"] == "body_timeout"
        assert headers["connection"] == "close"
        assert await closed_by_server(reader)
        await close(writer)
        reader, writer = await peer.connect()
        writer.write(b"POST /v1/infer HTTP/1.1\r\nContent-Le")
        assert await closed_by_server(reader)
        await close(writer)
        assert not model.started.is_set()


async def test_idle_kept_alive_connection_is_closed(peer: Peer) -> None:
    """A kept-alive connection idle past the keep-alive time is closed."""
    peer.front.keepalive_s = 0.05
    reader, writer = await peer.connect()
    writer.write(post("/v1/infer", peer.infer_body()))
    assert (await read_answer(reader))[0] == 200
    assert await closed_by_server(reader)
    await close(writer)


async def test_client_that_leaves_cancels_its_request(tiny_manifest: Manifest) -> None:
    """When the client closes the connection (or only its sending side), the request it
    waited for is cancelled: nobody is left to read the answer."""
    model = StuckModel(tiny_manifest.get("T1"))
    async with serve(tiny_manifest, model) as peer:
        _, writer = await peer.connect()
        writer.write(post("/v1/infer", peer.infer_body()))
        async with asyncio.timeout(READ_S):
            await model.started.wait()
        writer.transport.abort()
        async with asyncio.timeout(READ_S):
            await model.cancelled.wait()
        assert not peer.front.connections


async def test_shutdown_lets_the_request_in_flight_finish(tiny_manifest: Manifest) -> None:
    """Closing the server answers the request in flight (with a close), then stops."""
    model = StuckModel(tiny_manifest.get("T1"))
    async with serve(tiny_manifest, model) as peer:
        reader, writer = await peer.connect()
        idle_reader, idle_writer = await peer.connect()
        writer.write(post("/v1/infer", peer.infer_body()))
        async with asyncio.timeout(READ_S):
            await model.started.wait()
        closing = asyncio.create_task(peer.server.aclose())
        assert await closed_by_server(idle_reader)  # an idle connection goes at once
        model.release.set()
        status, headers, _ = await read_answer(reader)
        assert status == 200
        assert headers["connection"] == "close"
        await closing
        await close(writer)
        await close(idle_writer)


async def test_aiohttp_only_server_has_no_front(tiny_manifest: Manifest, engine: Engine) -> None:
    """``lean=False`` serves every request by aiohttp (what ``--http aiohttp`` does)."""
    async with serve(tiny_manifest, engine, lean=False) as peer:
        http = peer.server
        assert http.front is None
        reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await read_answer(reader)
        assert status == 200
        assert "aiohttp" in headers["server"]
        await close(writer)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    junk=st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.sampled_from(
                [
                    b"POST /v1/infer HTTP/1.1\r\n",
                    b"POST /v1/infer/batch HTTP/1.1\r\n",
                    b"POST /v1/session HTTP/1.0\r\n",
                    b"Content-Length: 3\r\n",
                    b"Content-Length: -1\r\n",
                    b"Content-Length: 99999999999\r\n",
                    b"Connection: close\r\n",
                    b"Connection: upgrade\r\n",
                    b"Expect: 100-continue\r\n",
                    b"Vswarm-Session: 00\r\n",
                    b" folded\r\n",
                    b"\r\n",
                    b"{}",
                    b"\x00\xff",
                ]
            ),
            max_size=8,
        ).map(b"".join),
    )
)
async def test_any_bytes_get_an_answer_or_a_close_and_the_peer_serves_on(
    peer: Peer, junk: bytes
) -> None:
    """Whatever a client sends, the peer answers or closes, and a new connection is served."""
    reader, writer = await peer.connect()
    writer.write(junk)
    writer.write_eof()
    async with asyncio.timeout(READ_S):
        answer = await reader.read()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
    await close(writer)
    reader, writer = await peer.connect()
    writer.write(post("/v1/infer", peer.infer_body()))
    assert (await read_answer(reader))[0] == 200
    await close(writer)
