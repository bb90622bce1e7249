"""The one seam between a requester and its peers: links, and the pipes they run over.

A ``Transport`` opens (or reuses) a ``Link`` to a peer; a link carries groups of asks
and brings back each group's ``ReplyBatch``, or raises a ``SwarmError``. The requester
talks to peers through nothing else. Two transports implement it: ``swarm.link.websocket``
(aiohttp WebSockets, what peers use) and ``swarm.link.memory`` (in-process, for tests).

Both run the same protocol over a ``Pipe`` (whole binary messages, in order): the signed
handshake (``swarm.crypto.session``), then sealed msgpack messages (``swarm.wire.codec``).
``ClientLink`` is the requester's end of it, ``serve_link`` the peer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Coroutine, Sequence
from typing import Any, Final, Protocol

from swarm import config
from swarm.crypto.identity import Identity
from swarm.crypto.session import HelloGuard, Offer, Sealer
from swarm.discovery.table import PeerRecord
from swarm.errors import (
    DecodeError,
    PeerTimeoutError,
    PeerUnreachableError,
    ProtocolError,
    SwarmError,
    VerificationError,
)
from swarm.link.answer import Answerer
from swarm.log import get_logger
from swarm.wire import codec
from swarm.wire.messages import Answers, Ask, Asks, InferRequest, ItemError, ReplyBatch, unix_ms

log = get_logger(__name__)

OVERLOADED: Final = "overloaded"
INTERNAL_ERROR: Final = "internal_error"
_REASON_CHARS: Final = 200


class Pipe(Protocol):
    """Whole binary messages in order, both ways. ``send`` writes at once, before its
    first suspension (sealed messages must leave in the order they were sealed), and
    ``receive`` raises ``PeerUnreachableError`` once the other end is gone."""

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bytes: ...

    async def close(self, reason: str) -> None: ...


class Link(Protocol):
    """An open link to one peer."""

    @property
    def peer_id(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    async def exchange(self, requests: Sequence[InferRequest]) -> ReplyBatch:
        """Ask ``requests`` as one group; the peer's answers, in order. The caller
        bounds the time."""
        ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    """Opens links to peers, and keeps them."""

    async def link(self, record: PeerRecord) -> Link:
        """An open link to ``record``'s peer: the one held, or a new one."""
        ...

    async def healthy(self, record: PeerRecord) -> bool:
        """Whether ``record``'s peer answers at all (a suspected peer is probed so)."""
        ...

    async def aclose(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class LinkConfig:
    """What both ends of a link agree on: who asks, in which swarm and family."""

    identity: Identity
    swarm: str
    family: str
    freshness_s: float = config.DEFAULT_TIMINGS.freshness_s


class ClientLink:
    """The requester's end of a link: asks go out sealed, a reader task matches the
    answers to them by exchange number. A broken link fails every exchange still out
    and stays closed; the transport opens another on the next ask."""

    def __init__(self, pipe: Pipe, out: Sealer, into: Sealer, *, peer_id: str, max_asks: int):
        self._pipe = pipe
        self._out = out
        self._in = into
        self._peer_id = peer_id
        self._max_asks = max_asks
        self._asks_out = 0
        self._next = 0
        self._pending: dict[int, tuple[asyncio.Future[ReplyBatch], int]] = {}
        self._failure: SwarmError | None = None
        self._reader = asyncio.get_running_loop().create_task(
            self._read(), name=f"vswarm-link-{peer_id}"
        )

    def __repr__(self) -> str:
        state = f"closed ({self._failure})" if self._failure else f"{len(self._pending)} out"
        return f"<ClientLink peer={self._peer_id} {state}>"

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def closed(self) -> bool:
        return self._failure is not None

    async def exchange(self, requests: Sequence[InferRequest]) -> ReplyBatch:
        if self._failure is not None:
            raise _copy(self._failure)
        if self._asks_out + len(requests) > self._max_asks:
            raise PeerUnreachableError(
                f"{self._peer_id} takes {self._max_asks} asks in flight on a link; "
                f"{self._asks_out} are out"
            )
        number = self._next
        self._next += 1
        asks = Asks(
            number,
            tuple(Ask(r.request_id, r.k, r.deadline_ms, r.input) for r in requests),
        )
        future: asyncio.Future[ReplyBatch] = asyncio.get_running_loop().create_future()
        self._pending[number] = (future, len(requests))
        self._asks_out += len(requests)
        try:
            await self._pipe.send(self._out.seal(codec.encode_asks(asks)))
            return await future
        finally:
            if self._pending.pop(number, None) is not None:
                self._asks_out -= len(requests)

    async def _read(self) -> None:
        try:
            while True:
                data = await self._pipe.receive()
                answers = codec.decode_answers(self._in.open(data), responder_id=self._peer_id)
                entry = self._pending.pop(answers.exchange, None)
                if entry is None:
                    if answers.exchange >= self._next:
                        raise DecodeError(f"answers to exchange {answers.exchange}, never asked")
                    continue  # its asker gave up (the requester's aclose)
                future, count = entry
                self._asks_out -= count
                if len(answers.batch.items) != count:
                    raise DecodeError(
                        f"{len(answers.batch.items)} answers to a group of {count} asks"
                    )
                if not future.done():
                    future.set_result(answers.batch)
        except SwarmError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(PeerUnreachableError(f"the link to {self._peer_id} was closed"))
            raise

    def _fail(self, exc: SwarmError) -> None:
        if self._failure is not None:
            return
        self._failure = exc
        if isinstance(exc, ProtocolError):
            log.warning("link_broken", peer=self._peer_id, reason=str(exc)[:_REASON_CHARS])
        else:
            log.info("link_closed", peer=self._peer_id, reason=str(exc)[:_REASON_CHARS])
        pending, self._pending = self._pending, {}
        self._asks_out = 0
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(_copy(exc))

    async def aclose(self) -> None:
        """Close the link; exchanges still out fail. Idempotent."""
        self._fail(PeerUnreachableError(f"the link to {self._peer_id} was closed"))
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._pipe.close("closed by the requester")


async def open_link(
    pipe: Pipe, config_: LinkConfig, record: PeerRecord, *, timeout_s: float
) -> ClientLink:
    """Run the requester's side of the handshake on ``pipe`` to ``record``'s peer."""
    offer = Offer(config_.identity, swarm=config_.swarm, family=config_.family)
    try:
        async with asyncio.timeout(timeout_s):
            await pipe.send(codec.encode_handshake(offer.hello))
            welcome = codec.decode_welcome(await pipe.receive())
    except TimeoutError:
        await pipe.close("handshake timed out")
        raise PeerTimeoutError(
            f"{record.peer_id} did not answer the link's hello within {timeout_s:g} s"
        ) from None
    except SwarmError:
        await pipe.close("bad welcome")
        raise
    try:
        out, into = offer.accept(
            welcome,
            expected_peer_id=record.peer_id,
            expected_key=record.public_key,
            now_ms=unix_ms(),
            freshness_s=config_.freshness_s,
        )
    except VerificationError:
        await pipe.close("bad welcome")
        raise
    return ClientLink(pipe, out, into, peer_id=record.peer_id, max_asks=welcome.max_asks)


# --- the peer's end ---------------------------------------------------------------------


async def serve_link(
    pipe: Pipe,
    guard: HelloGuard,
    answerer: Answerer,
    *,
    max_asks: int,
    handshake_timeout_s: float,
    remote: str,
) -> None:
    """Serve one link on ``pipe`` until it ends: the handshake, then every group of asks
    answered as it is ready (many in flight). A malformed, unauthenticated or out-of-order
    message ends the link with one logged line and touches nothing else."""
    try:
        async with asyncio.timeout(handshake_timeout_s):
            hello = codec.decode_hello(await pipe.receive())
        welcome, out, into = guard.accept(hello, now_ms=unix_ms())
        await pipe.send(codec.encode_handshake(welcome))
    except TimeoutError:
        log.info("link_refused", remote=remote, reason="no hello in time")
        await pipe.close("no hello in time")
        return
    except SwarmError as exc:
        reason = exc.reason if isinstance(exc, VerificationError) else "malformed"
        log.info("link_refused", remote=remote, reason=reason, detail=str(exc)[:_REASON_CHARS])
        await pipe.close(f"{reason}: {exc}"[:_REASON_CHARS])
        return
    requester = hello.requester_id
    log.debug("link_opened", remote=remote, requester=requester)
    server = _Server(pipe, out, answerer, requester=requester, max_asks=max_asks)
    try:
        while True:
            data = await pipe.receive()
            server.take(codec.decode_asks(into.open(data), input_len=answerer.input_len))
    except PeerUnreachableError:
        log.debug("link_ended", remote=remote, requester=requester)
    except SwarmError as exc:
        log.info("link_broken", remote=remote, requester=requester, reason=str(exc)[:200])
        await pipe.close(str(exc)[:_REASON_CHARS])
    finally:
        await server.aclose()


class _Server:
    """The groups of asks one link has in flight on the peer."""

    def __init__(
        self, pipe: Pipe, out: Sealer, answerer: Answerer, *, requester: str, max_asks: int
    ) -> None:
        self._pipe = pipe
        self._out = out
        self._answerer = answerer
        self._requester = requester
        self._max_asks = max_asks
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def take(self, asks: Asks) -> None:
        """Start answering ``asks``, or refuse them at once when the link is full."""
        if self._in_flight + len(asks.items) > self._max_asks:
            # Refused, not queued: the link's memory stays bounded, the requester learns why.
            message = f"this peer has {self._in_flight} asks in flight on this link already"
            items = tuple(ItemError(a.request_id, OVERLOADED, message) for a in asks.items)
            refusal = Answers(asks.exchange, ReplyBatch(self._answerer.peer_id, items, b""))
            self._start(self._send(refusal))
            log.info("asks_refused", requester=self._requester, asks=len(asks.items))
            return
        self._in_flight += len(asks.items)
        self._start(self._answer(asks))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work, name="vswarm-answer")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _answer(self, asks: Asks) -> None:
        try:
            batch = await self._answerer.answer(self._requester, asks.items)
        except Exception:  # a bug answering must cost these asks, not the requester's wait
            log.exception("answer_crashed", requester=self._requester, asks=len(asks.items))
            message = "this peer failed to answer; the failure was logged"
            items = tuple(ItemError(a.request_id, INTERNAL_ERROR, message) for a in asks.items)
            batch = ReplyBatch(self._answerer.peer_id, items, b"")
        finally:
            self._in_flight -= len(asks.items)
        await self._send(Answers(asks.exchange, batch))

    async def _send(self, answers: Answers) -> None:
        # Sealed and written in one step: answers leave in the order of their nonces.
        await self._pipe.send(self._out.seal(codec.encode_answers(answers)))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            if isinstance(exc, SwarmError):  # the link went away meanwhile
                log.debug("answer_not_sent", requester=self._requester, error=str(exc))
            else:
                log.error("answer_crashed", requester=self._requester, exc_info=exc)

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def _copy(exc: SwarmError) -> SwarmError:
    """``exc`` for one more caller, each with its own exception object."""
    if isinstance(exc, VerificationError):
        copy: SwarmError = VerificationError(exc.reason, exc.detail)
    else:
        try:
            copy = type(exc)(str(exc))
        except TypeError:
            copy = PeerUnreachableError(str(exc))
    copy.__cause__ = exc
    return copy


class LinkPool:
    """A transport's links, one per peer: reused while open, opened on first use, one
    opening per peer shared by its concurrent callers. Subclasses ``connect``."""

    def __init__(self, *, open_timeout_s: float) -> None:
        self.open_timeout_s = open_timeout_s
        self._links: dict[str, ClientLink] = {}
        self._opening: dict[str, asyncio.Task[ClientLink]] = {}
        self._closed = False

    async def connect(self, record: PeerRecord) -> ClientLink:
        """A new link to ``record``'s peer, handshake done, within ``open_timeout_s``."""
        raise NotImplementedError

    async def healthy(self, record: PeerRecord) -> bool:
        raise NotImplementedError

    async def link(self, record: PeerRecord) -> ClientLink:
        if self._closed:
            raise PeerUnreachableError("the transport is closed")
        held = self._links.get(record.peer_id)
        if held is not None and not held.closed:
            return held
        opening = self._opening.get(record.peer_id)
        if opening is None:
            # A task of its own: a caller that gives up leaves it to finish for the next.
            opening = asyncio.get_running_loop().create_task(
                self._open(record), name="vswarm-link-open"
            )
            self._opening[record.peer_id] = opening
            opening.add_done_callback(lambda task: self._opened(record.peer_id, task))
        return await asyncio.shield(opening)

    async def _open(self, record: PeerRecord) -> ClientLink:
        old = self._links.pop(record.peer_id, None)
        if old is not None:
            await old.aclose()
        link = await self.connect(record)
        if self._closed:
            await link.aclose()
            raise PeerUnreachableError("the transport is closed")
        self._links[record.peer_id] = link
        while len(self._links) > config.MAX_PEERS:
            _, oldest = next(iter(self._links.items()))
            self._links.pop(oldest.peer_id)
            await oldest.aclose()
        return link

    def _opened(self, peer_id: str, task: asyncio.Task[ClientLink]) -> None:
        if self._opening.get(peer_id) is task:
            del self._opening[peer_id]
        if not task.cancelled():
            task.exception()  # retrieved: its callers raise it

    async def aclose(self) -> None:
        """Close every link; idempotent."""
        if self._closed:
            return
        self._closed = True
        opening = list(self._opening.values())
        for task in opening:
            task.cancel()
        if opening:
            await asyncio.wait(opening)
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.aclose()
