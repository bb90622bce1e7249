"""A small HTTP/1.1 client for the requester's POSTs to peers, over pooled connections.

A classify call POSTs to five peers, and on a small board aiohttp's client costs about
270 us of CPU per request (``sim.bench``'s fast-path table puts it back), more than the
lighter variants take to run. This client speaks only what a peer's aiohttp server
answers to a POST: a status line, headers, and a body sized by ``Content-Length`` or
chunked (or, failing both, ended by closing the connection). It costs about 50 us.

Connections are kept alive and pooled per host and port, at most ``per_host`` open at
once (callers past that wait). Everything read is bounded: the status line and the
header lines together by the head limit, the header count, the body by the caller's
limit. A connection whose exchange did not finish cleanly (an error, a cancellation, a
timeout) is closed, never reused. A request on a kept-alive connection that the server
had closed meanwhile is sent once more on a new connection, as HTTP/1.1 clients do
(RFC 9112 section 9.3.1), only when no byte of an answer came back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Final

from swarm.errors import MessageTooLargeError, PeerUnreachableError

_HEAD_LIMIT: Final = 16 * 1024  # the longest answer head (status line and headers) read
_MAX_HEADERS: Final = 100
_CRLF: Final = b"\r\n"
_END: Final = b"\r\n\r\n"  # the blank line that ends a head


class ConnectFailed(PeerUnreachableError):
    """No connection to that host and port: another of the peer's addresses may work."""


class BadAnswer(PeerUnreachableError):
    """The connection broke, or what came back is not an HTTP/1.1 answer we accept."""


@dataclasses.dataclass(frozen=True, slots=True)
class HttpAnswer:
    """One answer: its status, headers (names in lower case) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class _Stale(Exception):
    """A kept-alive connection closed before any byte of the answer: resend once."""


class HttpPool:
    """Keep-alive connections to peers, and POST over them."""

    def __init__(
        self,
        *,
        per_host: int,
        connect_timeout_s: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if per_host < 1:
            raise ValueError(f"per_host must be >= 1, got {per_host}")
        self._per_host = per_host
        self._connect_timeout_s = connect_timeout_s
        self._static = _header_lines(headers or {})
        self._idle: dict[tuple[str, int], collections.deque[_Connection]] = {}
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._closed = False

    def __repr__(self) -> str:
        idle = sum(len(q) for q in self._idle.values())
        return f"<HttpPool hosts={len(self._slots)} idle={idle} closed={self._closed}>"

    async def post(
        self,
        host: str,
        port: int,
        path: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        max_body: int,
    ) -> HttpAnswer:
        """POST ``body`` to ``http://host:port/path``; the answer, whatever its status.

        ``ConnectFailed`` when no connection can be made, ``BadAnswer`` when the exchange
        breaks, ``MessageTooLargeError`` for a body over ``max_body``. The caller bounds
        the time (a cancelled exchange closes its connection).
        """
        if self._closed:
            raise PeerUnreachableError("the HTTP pool is closed")
        extra = _header_lines(headers or {})
        if not path.startswith("/") or any(c in path for c in " \r\n"):
            raise ValueError(f"bad request path {path[:60]!r}")
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{self._static}{extra}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        key = (host, port)
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(self._per_host)
        async with slots:
            idle = self._idle.get(key)
            conn = idle.pop() if idle else None
            if conn is not None:
                try:
                    return await self._exchange(key, conn, head + body, max_body, reused=True)
                except _Stale:
                    pass  # the server had closed it: once more, on a new connection
            conn = await self._connect(host, port)
            return await self._exchange(key, conn, head + body, max_body, reused=False)

    async def _connect(self, host: str, port: int) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                reader, writer = await asyncio.open_connection(host, port, limit=_HEAD_LIMIT)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc!r}") from exc
        return _Connection(reader, writer)

    async def _exchange(
        self,
        key: tuple[str, int],
        conn: _Connection,
        request: bytes,
        max_body: int,
        *,
        reused: bool,
    ) -> HttpAnswer:
        done = False
        try:
            conn.writer.write(request)
            try:
                head = await conn.reader.readuntil(_END)
            except asyncio.IncompleteReadError as exc:
                if not exc.partial and reused:
                    raise _Stale from exc
                if not exc.partial:
                    raise BadAnswer("the peer closed the connection without answering") from exc
                raise BadAnswer("the connection closed inside the answer's head") from exc
            except asyncio.LimitOverrunError as exc:
                raise BadAnswer(f"the answer's head exceeds {_HEAD_LIMIT} bytes") from exc
            answer, keep_alive = await _read_answer(conn.reader, head, max_body)
            done = True
        except (OSError, ValueError) as exc:
            if reused and isinstance(exc, ConnectionResetError | BrokenPipeError):
                raise _Stale from exc
            raise BadAnswer(f"the exchange broke: {exc!r}") from exc
        except asyncio.IncompleteReadError as exc:
            raise BadAnswer(f"the connection closed inside the answer: {exc!r}") from exc
        finally:
            if not done:
                conn.close()
        if keep_alive and not self._closed:
            idle = self._idle.setdefault(key, collections.deque())
            if len(idle) < self._per_host:
                idle.append(conn)
                return answer
        conn.close()
        return answer

    async def aclose(self) -> None:
        """Close every idle connection; later posts fail. Idempotent."""
        self._closed = True
        idle, self._idle = self._idle, {}
        writers = [conn.writer for queue in idle.values() for conn in queue]
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_answer(
    reader: asyncio.StreamReader, head: bytes, max_body: int
) -> tuple[HttpAnswer, bool]:
    """The answer whose head (status line and headers, up to the blank line) is ``head``;
    its body is read from ``reader``."""
    lines = head[: -len(_END)].split(_CRLF)
    status_line = lines[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit():
        raise BadAnswer(f"not an HTTP/1.1 status line: {status_line[:60]!r}")
    status = int(parts[1])
    if not 100 <= status <= 599:
        raise BadAnswer(f"status {status} is out of range")
    if len(lines) - 1 > _MAX_HEADERS:
        raise BadAnswer(f"more than {_MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise BadAnswer(f"malformed header line {line[:60]!r}")
        headers[name.lower()] = value.strip()
    keep_alive = parts[0] == b"HTTP/1.1" and headers.get("connection", "").lower() != "close"
    length_text = headers.get("content-length")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader, max_body)
    elif length_text is not None:
        if not length_text.isdigit():
            raise BadAnswer(f"bad Content-Length {length_text[:40]!r}")
        length = int(length_text)
        if length > max_body:
            raise MessageTooLargeError(f"answer is {length} bytes; the limit is {max_body}")
        body = await reader.readexactly(length)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:  # no length given: the body runs to the end of the connection
        body = await reader.read(max_body + 1)
        while len(body) <= max_body and (more := await reader.read(max_body + 1 - len(body))):
            body += more
        if len(body) > max_body:
            raise MessageTooLargeError(f"answer exceeds the limit of {max_body} bytes")
        keep_alive = False
    return HttpAnswer(status, headers, body), keep_alive


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readline()
        size_text = size_line.split(b";", 1)[0].strip()
        if not size_line.endswith(b"\n") or not size_text:
            raise BadAnswer("malformed chunk size line")
        size = int(size_text, 16)  # ValueError: the caller's BadAnswer
        if size == 0:
            while (trailer := await reader.readline()) not in (_CRLF, b"\n"):
                if not trailer:
                    raise BadAnswer("the connection closed inside the trailers")
            return bytes(body)
        if len(body) + size > max_body:
            raise MessageTooLargeError(f"answer exceeds the limit of {max_body} bytes")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != _CRLF:
            raise BadAnswer("a chunk does not end with CRLF")


def _header_lines(headers: Mapping[str, str]) -> str:
    # Our own values (ids, base64 MACs), but a line break would start another header.
    lines = []
    for name, value in headers.items():
        if not name or any(c in name for c in ":\r\n ") or any(c in value for c in "\r\n"):
            raise ValueError(f"bad header {name[:40]!r}: {value[:40]!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


__all__ = ["BadAnswer", "ConnectFailed", "HttpAnswer", "HttpPool"]
