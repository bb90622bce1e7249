"""An in-memory transport for unit tests: peers in the same process, no sockets.

The same protocol as the WebSocket link runs over a pair of queues: the signed handshake,
sealed msgpack messages and the peer's ``serve_link``, so tests exercise all of it but
the network (as httpcore's mock backend does for HTTP).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Final

from swarm import config
from swarm.crypto.session import HelloGuard
from swarm.discovery.table import PeerRecord
from swarm.errors import PeerUnreachableError
from swarm.link.answer import Answerer
from swarm.link.transport import ClientLink, LinkConfig, LinkPool, open_link, serve_link

_CLOSED: Final = b""  # what a closed end puts in the queue: no sealed message is empty


class MemoryPipe:
    """One end of an in-memory pipe."""

    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes]) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self.closed_reason: str | None = None
        self.sent = 0  # bytes sent, as a socket would count them

    async def send(self, data: bytes) -> None:
        if self.closed_reason is not None:
            raise PeerUnreachableError(f"the pipe is closed: {self.closed_reason}")
        self.sent += len(data)
        self._outbox.put_nowait(data)

    async def receive(self) -> bytes:
        if self.closed_reason is not None:
            raise PeerUnreachableError(f"the pipe is closed: {self.closed_reason}")
        data = await self._inbox.get()
        if data is _CLOSED or not data:
            self.closed_reason = "closed by the other end"
            raise PeerUnreachableError("the other end closed the pipe")
        return data

    async def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self._outbox.put_nowait(_CLOSED)


def pipe_pair() -> tuple[MemoryPipe, MemoryPipe]:
    """Two connected ends: what one sends, the other receives."""
    a: asyncio.Queue[bytes] = asyncio.Queue()
    b: asyncio.Queue[bytes] = asyncio.Queue()
    return MemoryPipe(a, b), MemoryPipe(b, a)


@dataclasses.dataclass(slots=True)
class MemoryPeer:
    """A peer of a ``MemoryNetwork``: how it checks hellos and answers asks."""

    guard: HelloGuard
    answerer: Answerer
    max_asks: int = config.MAX_LINK_ASKS
    reachable: bool = True


class MemoryNetwork:
    """Peers reachable by peer id; every link opened runs ``serve_link`` in a task."""

    def __init__(self) -> None:
        self.peers: dict[str, MemoryPeer] = {}
        self._servers: set[asyncio.Task[None]] = set()

    def add(self, peer: MemoryPeer) -> None:
        self.peers[peer.answerer.peer_id] = peer

    def transport(self, link_config: LinkConfig, *, open_timeout_s: float = 1.0) -> MemoryTransport:
        return MemoryTransport(self, link_config, open_timeout_s=open_timeout_s)

    def dial(self, peer_id: str) -> MemoryPipe:
        peer = self.peers.get(peer_id)
        if peer is None or not peer.reachable:
            raise PeerUnreachableError(f"no peer {peer_id} on this network")
        client, server = pipe_pair()
        task = asyncio.get_running_loop().create_task(
            serve_link(
                server,
                peer.guard,
                peer.answerer,
                max_asks=peer.max_asks,
                handshake_timeout_s=1.0,
                remote="memory",
            )
        )
        self._servers.add(task)
        task.add_done_callback(self._servers.discard)
        return client

    async def aclose(self) -> None:
        tasks = list(self._servers)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


class MemoryTransport(LinkPool):
    """Links to the peers of a ``MemoryNetwork``."""

    def __init__(
        self, network: MemoryNetwork, link_config: LinkConfig, *, open_timeout_s: float
    ) -> None:
        super().__init__(open_timeout_s=open_timeout_s)
        self._network = network
        self._config = link_config

    async def healthy(self, record: PeerRecord) -> bool:
        peer = self._network.peers.get(record.peer_id)
        return peer is not None and peer.reachable

    async def connect(self, record: PeerRecord) -> ClientLink:
        pipe = self._network.dial(record.peer_id)
        return await open_link(pipe, self._config, record, timeout_s=self.open_timeout_s)
