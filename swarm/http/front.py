"""The peer's HTTP front: peer-to-peer POSTs on a lean path, everything else by aiohttp.

A classify call costs each asked peer one ``POST /v1/infer`` (or ``/v1/infer/batch``),
and on a small board aiohttp's server machinery around the handler (its parser hooks,
request and response objects, middleware, writer) costs about as much CPU as the lighter
variants take to run. ``FrontProtocol`` reads those requests itself: a request line, a
few headers, a body sized by ``Content-Length``, within the route's limit. It hands the
request to ``server.PeerCalls``, the same code aiohttp's routes for those paths call, and
writes the answer in one send.

Anything else (another path or method, a query string, a chunked body, ``Expect``,
``Upgrade``, HTTP/1.0, a body over the route's limit, a head it cannot parse) hands the
connection over to aiohttp as it stands, bytes already read included, between two
requests: aiohttp then answers it exactly as it answers a connection of its own, errors
included, and keeps the connection. So the front never answers differently from aiohttp,
only faster.

Every wait is bounded: a request's head and body must arrive within the body-read time
(else 408, or a close if no head came), an idle kept-alive connection is closed after the
keep-alive time, and a client that stops reading answers stops being read from. A
connection that the client closes (even its sending side only) cancels the request it
was waiting for.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from http import HTTPStatus
from typing import Final, cast

from aiohttp import web

from swarm import config
from swarm.http.api import JSON_TYPE, PEER_ROUTES, PeerAnswer, PeerCalls, error_json
from swarm.log import get_logger

log = get_logger(__name__)

HEAD_LIMIT: Final = 8 * 1024  # the longest request line and headers read here
MAX_HEADERS: Final = 32
KEEPALIVE_S: Final = 75.0  # as aiohttp's server: an idle kept-alive connection is closed
_END: Final = b"\r\n\r\n"
_CONTENT_TYPE: Final = f"{JSON_TYPE}; charset=utf-8".encode()
# Header names after which the front leaves a request to aiohttp: each asks for something
# the lean path does not do (chunked bodies, 100-continue, protocol switches).
_HAND_OVER_HEADERS: Final = frozenset({"transfer-encoding", "expect", "upgrade"})
# The request line of a peer-to-peer POST, then at most MAX_HEADERS header lines: a token
# name (RFC 9110 section 5.6.2), a colon, and a value of visible characters, spaces and
# tabs (no other control character, no folded continuation line).
_HEAD: Final = re.compile(
    b"POST ("
    + b"|".join(re.escape(path.encode()) for path in PEER_ROUTES)
    + rb") HTTP/1\.1\r\n((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n){0,"
    + str(MAX_HEADERS).encode()
    + b"})"
)
# Status lines, made once: HTTPStatus(code).phrase is an enum lookup per answer.
_STATUS_LINES: Final = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class Front:
    """The protocol factory of one peer's listening sockets, and its open connections."""

    def __init__(
        self,
        calls: PeerCalls,
        aiohttp_server: web.Server,
        *,
        body_timeout_s: float = config.DEFAULT_TIMINGS.body_read_timeout_s,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.calls = calls
        self.aiohttp_server = aiohttp_server
        self.metrics = calls.ctx.metrics
        self.body_timeout_s = body_timeout_s
        self.keepalive_s = keepalive_s
        self.connections: set[FrontProtocol] = set()
        self.handed_over = 0  # connections given to aiohttp (the tests read it)

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    async def shutdown(self, timeout_s: float) -> None:
        """Close idle connections now; give requests in flight ``timeout_s`` to finish."""
        busy = []
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
            else:
                conn.closing = True
                busy.append(conn.task)
        if busy:
            await asyncio.wait(busy, timeout=timeout_s)
        for conn in list(self.connections):
            conn.abort()


class FrontProtocol(asyncio.Protocol):
    """One connection: requests parsed and answered here until one is not ours."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None  # the request being answered
        self.closing = False  # answer the request in flight, then close
        self._head: tuple[str, dict[str, str], int, bool] | None = None  # parsed, body due
        self._timer: asyncio.TimerHandle | None = None
        self._reading = True
        self._writable = True
        self._timer_kind = ""  # "idle" (between requests) or "request" (one is arriving)

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not derive from asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self.front.connections.add(self)
        self._arm(self.front.keepalive_s)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self._next()
        # A client that sends faster than it is answered is not read from meanwhile.
        if self._reading and len(self.buffer) > 2 * config.MAX_INFER_BATCH_BODY:
            assert self.transport is not None
            self.transport.pause_reading()
            self._reading = False

    def eof_received(self) -> bool:
        # The client sends nothing more. Peers' clients never half-close a connection they
        # still read from, and a requester that gave up closes it: close, which cancels
        # the request in flight instead of running a model for nobody.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self._disarm()
        if self.task is not None:
            self.task.cancel()  # nobody is left to read the answer
        self.transport = None

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        if self.task is None:
            self._next()

    # --- closing ---

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- requests ---

    def _next(self) -> None:
        """Start answering the next whole request in the buffer, if there is one."""
        transport = self.transport
        if transport is None or not self._writable:
            return
        if self._head is None:
            if not self.buffer:
                self._arm(self.front.keepalive_s)
                return
            end = self.buffer.find(_END, 0, HEAD_LIMIT + len(_END))
            if end < 0:
                if len(self.buffer) > HEAD_LIMIT:
                    self._hand_over()  # aiohttp answers a head too long as it does
                else:
                    self._arm_request()
                return
            head = _parse_head(bytes(self.buffer[:end]))
            if head is None:
                self._hand_over()
                return
            del self.buffer[: end + len(_END)]
            self._head = head
        path, headers, length, close = self._head
        if len(self.buffer) < length:
            self._arm_request()
            return
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        self._head = None
        self._disarm()
        if not self._reading:
            transport.resume_reading()
            self._reading = True
        self.closing = self.closing or close
        self.task = asyncio.get_running_loop().create_task(self._serve(path, headers, body))
        self.task.add_done_callback(self._served)

    async def _serve(self, path: str, headers: dict[str, str], body: bytes) -> None:
        started = time.perf_counter()
        answer = await self.front.calls.answer(path, headers, body)
        self._write(answer)
        self.front.metrics.observe_request(path, answer.status)
        log.debug(
            "http_served",
            endpoint=path,
            status=answer.status,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )

    def _served(self, task: asyncio.Task[None]) -> None:
        self.task = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            # PeerCalls.answer raises nothing; should it, the client must not hang.
            log.error("front_request_crashed", error=repr(exc))
            self.abort()
            return
        if self.closing:
            self.close()
        else:
            self._next()

    def _write(self, answer: PeerAnswer) -> None:
        transport = self.transport
        if transport is None:
            return
        lines = [
            _STATUS_LINES[answer.status],
            b"Content-Type: " + _CONTENT_TYPE + b"\r\n",
            b"Content-Length: %d\r\n" % len(answer.body),
        ]
        lines += [f"{k}: {v}\r\n".encode("latin-1") for k, v in answer.headers.items()]
        if self.closing:
            lines.append(b"Connection: close\r\n")
        transport.write(b"".join(lines) + b"\r\n" + answer.body)

    def _hand_over(self) -> None:
        """Give this connection, and what it sent that is not answered yet, to aiohttp."""
        transport = self.transport
        assert transport is not None
        assert self.task is None
        self._disarm()
        self.front.connections.discard(self)
        self.front.handed_over += 1
        self.transport = None
        protocol = self.front.aiohttp_server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not self._reading:
            transport.resume_reading()
        if not self._writable:
            protocol.pause_writing()
        if self.buffer:
            data, self.buffer = bytes(self.buffer), bytearray()
            protocol.data_received(data)

    # --- timers ---

    def _arm(self, seconds: float, *, kind: str = "idle") -> None:
        self._disarm()
        self._timer_kind = kind
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _arm_request(self) -> None:
        # Once, at a request's first byte: its head and body must all arrive in time.
        if self._timer is None or self._timer_kind != "request":
            self._arm(self.front.body_timeout_s, kind="request")

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.task is not None:
            return
        if self._head is not None:  # a head came, its body did not: say so, then close
            path = self._head[0]
            self._head = None
            self.closing = True
            with contextlib.suppress(RuntimeError):
                self._write(_timed_out(self.front.body_timeout_s))
            self.front.metrics.observe_request(path, 408)
        self.close()


def _timed_out(seconds: float) -> PeerAnswer:
    message = f"the request body did not arrive within {seconds:g} s"
    return PeerAnswer(408, error_json("body_timeout", message), {})


def _parse_head(head: bytes) -> tuple[str, dict[str, str], int, bool] | None:
    """(path, headers, body length, close after) of a request the front answers; None
    for any other request, which aiohttp answers instead."""
    match = _HEAD.fullmatch(head + b"\r\n")
    if match is None:
        return None  # another method, path or version, or a malformed or folded header
    path = match.group(1).decode("ascii")
    lines = match.group(2).split(b"\r\n")[:-1]
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.decode("ascii").lower()] = value.decode("latin-1").strip(" \t")
    if len(headers) < len(lines) or not _HAND_OVER_HEADERS.isdisjoint(headers):
        return None  # a repeated header, or one that asks for more than the front does
    if "host" not in headers:
        return None  # HTTP/1.1 requires it; aiohttp answers 400 without it
    length_text = headers.get("content-length", "")
    connection = headers.get("connection", "").lower()
    if (
        not (length_text.isascii() and length_text.isdigit())  # absent, or not a count
        or len(length_text) > 9
        or int(length_text) > PEER_ROUTES[path]  # aiohttp's route answers 413 with the limit
        or connection not in ("", "keep-alive", "close")
    ):
        return None
    return path, headers, int(length_text), connection == "close"


__all__ = ["HEAD_LIMIT", "KEEPALIVE_S", "Front", "FrontProtocol"]
