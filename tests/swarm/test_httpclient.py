"""Tests of swarm.requester.httpclient against a real aiohttp server and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from swarm.errors import MessageTooLargeError
from swarm.requester.httpclient import BadAnswer, ConnectFailed, HttpPool

HOST = "127.0.0.1"


class Server:
    """An aiohttp app that echoes, streams chunks or closes, counting connections."""

    def __init__(self) -> None:
        self.connections: set[int] = set()
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/echo", self._echo)
        app.router.add_post("/chunked", self._chunked)
        app.router.add_post("/close", self._close)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, keepalive_timeout=30)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def _note(self, request: web.Request, body: bytes) -> None:
        transport = request.transport
        assert transport is not None
        self.connections.add(id(transport))
        self.requests.append((request.path, dict(request.headers), body))

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._note(request, body)
        return web.Response(body=body, status=int(request.query.get("status", "200")))

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self._note(request, body)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(body), 7):
            await resp.write(body[i : i + 7])
        await resp.write_eof()
        return resp

    async def _close(self, request: web.Request) -> web.Response:
        self._note(request, await request.read())
        return web.Response(body=b"bye", headers={"Connection": "close"})

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    await s.start()
    yield s
    await s.aclose()


@pytest.fixture
async def pool() -> AsyncIterator[HttpPool]:
    p = HttpPool(per_host=4, connect_timeout_s=2.0, headers={"User-Agent": "test"})
    yield p
    await p.aclose()


async def raw_server(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, int]:
    """A TCP server on 127.0.0.1 whose every connection ``answer`` handles."""
    server = await asyncio.start_server(answer, HOST, 0)
    return server, server.sockets[0].getsockname()[1]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.startswith(b"Content-Length")
    )
    return await reader.readexactly(length)


async def test_post_reuses_one_keep_alive_connection(server: Server, pool: HttpPool) -> None:
    for i in range(5):
        answer = await pool.post(
            HOST, server.port, "/echo", b"x" * i, headers={"Vswarm-Mac": "m"}, max_body=100
        )
        assert (answer.status, answer.body) == (200, b"x" * i)
    assert len(server.connections) == 1
    path, headers, _ = server.requests[0]
    assert (path, headers["Vswarm-Mac"], headers["User-Agent"]) == ("/echo", "m", "test")
    assert answer.headers["content-length"] == "4"


async def test_concurrent_posts_open_connections_up_to_the_limit(
    server: Server, pool: HttpPool
) -> None:
    answers = await asyncio.gather(
        *(pool.post(HOST, server.port, "/echo", b"%d" % i, max_body=10) for i in range(12))
    )
    assert sorted(a.body for a in answers) == sorted(b"%d" % i for i in range(12))
    assert 1 <= len(server.connections) <= 4


async def test_error_status_is_an_answer(server: Server, pool: HttpPool) -> None:
    answer = await pool.post(HOST, server.port, "/echo?status=409", b"no", max_body=10)
    assert (answer.status, answer.body) == (409, b"no")


async def test_chunked_answer_is_joined(server: Server, pool: HttpPool) -> None:
    body = bytes(range(256)) * 3
    answer = await pool.post(HOST, server.port, "/chunked", body, max_body=1000)
    assert answer.body == body
    again = await pool.post(HOST, server.port, "/echo", b"after", max_body=10)
    assert again.body == b"after"
    assert len(server.connections) == 1


async def test_connection_close_is_honoured(server: Server, pool: HttpPool) -> None:
    assert (await pool.post(HOST, server.port, "/close", b"", max_body=10)).body == b"bye"
    assert (await pool.post(HOST, server.port, "/echo", b"1", max_body=10)).body == b"1"
    assert len(server.connections) == 2


async def test_body_over_the_limit_is_refused(server: Server, pool: HttpPool) -> None:
    with pytest.raises(MessageTooLargeError):
        await pool.post(HOST, server.port, "/echo", b"x" * 11, max_body=10)
    with pytest.raises(MessageTooLargeError):
        await pool.post(HOST, server.port, "/chunked", b"x" * 30, max_body=20)
    assert (await pool.post(HOST, server.port, "/echo", b"ok", max_body=10)).body == b"ok"


async def test_refused_connection_is_connect_failed(pool: HttpPool) -> None:
    server, port = await raw_server(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectFailed):
        await pool.post(HOST, port, "/echo", b"", max_body=10)


async def test_closed_keep_alive_connection_is_retried_once() -> None:
    """The server closes each connection after one answer without saying so: the next
    request finds the kept connection dead and goes again on a new one."""
    served = 0

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        body = await read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server, port = await raw_server(once)
    pool = HttpPool(per_host=1, connect_timeout_s=2.0)
    try:
        for i in range(3):
            assert (await pool.post(HOST, port, "/x", b"%d" % i, max_body=10)).body == b"%d" % i
        assert served == 3
    finally:
        await pool.aclose()
        server.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno-colon-here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
        b"",
    ],
)
async def test_malformed_answers_are_bad_answers(answer: bytes) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server, port = await raw_server(reply)
    pool = HttpPool(per_host=1, connect_timeout_s=2.0)
    try:
        with pytest.raises(BadAnswer):
            await pool.post(HOST, port, "/x", b"q", max_body=100)
    finally:
        await pool.aclose()
        server.close()


async def test_answer_without_a_length_runs_to_the_close() -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    server, port = await raw_server(reply)
    pool = HttpPool(per_host=1, connect_timeout_s=2.0)
    try:
        assert (await pool.post(HOST, port, "/x", b"q", max_body=100)).body == b"until the end"
    finally:
        await pool.aclose()
        server.close()


async def test_cancelled_exchange_closes_its_connection(server: Server, pool: HttpPool) -> None:
    hold, arrived = asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await hold.wait()
        writer.close()

    raw, port = await raw_server(silent)
    try:
        task = asyncio.create_task(pool.post(HOST, port, "/x", b"q", max_body=10))
        await asyncio.wait_for(arrived.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert repr(pool).endswith("idle=0 closed=False>")
    finally:
        hold.set()
        raw.close()


@pytest.mark.parametrize(
    ("path", "headers"),
    [("/x\r\nEvil: 1", {}), ("no-slash", {}), ("/x", {"A": "b\r\nEvil: 1"}), ("/x", {"A:": "b"})],
)
async def test_line_breaks_in_path_or_headers_are_refused(
    pool: HttpPool, path: str, headers: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match="bad"):
        await pool.post(HOST, 1, path, b"", headers=headers, max_body=10)


async def test_closed_pool_refuses_posts(server: Server) -> None:
    pool = HttpPool(per_host=1, connect_timeout_s=2.0)
    assert (await pool.post(HOST, server.port, "/echo", b"1", max_body=10)).body == b"1"
    await pool.aclose()
    await pool.aclose()
    with pytest.raises(Exception, match="closed"):
        await pool.post(HOST, server.port, "/echo", b"1", max_body=10)
