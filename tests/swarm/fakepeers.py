"""Fake peers on the in-memory transport, for the requester's tests.

Each fake peer is an ``Answerer`` on a ``MemoryNetwork``: the requester reaches it through
the very handshake, sealing and codec of a real link, with no sockets. Its ``behaviour``
makes each reply (honest, slow, hung or misbehaving) and its ``signer`` signs each group
of replies. Peers enter the requester's peer table through ``PeerTable.offer``, as the
mDNS browser would put them there. A peer that "hangs" waits on an event the test sets.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from swarm import config
from swarm.config import Timings
from swarm.crypto.identity import Identity, TrustStore
from swarm.crypto.session import HelloGuard
from swarm.decision.reputation import ReputationBook
from swarm.discovery.table import Announcement, PeerRecord, PeerTable
from swarm.inference.manifest import Manifest, ModelSpec
from swarm.link.answer import Answerer
from swarm.link.memory import MemoryNetwork, MemoryPeer, MemoryTransport
from swarm.link.transport import OVERLOADED, ClientLink, LinkConfig
from swarm.metrics import Metrics
from swarm.requester.requester import Requester
from swarm.wire import codec
from swarm.wire.messages import (
    Ask,
    InferReply,
    InferRequest,
    ItemError,
    ReplyBatch,
    unix_ms,
)
from tests.swarm.conftest import CLASS_NAMES

SWARM = "test-swarm"
# No hedging unless a test asks for it; deadlines are passed per call.
TIMINGS = Timings(hedge_after_s=30.0, deadline_s=2.0)
TENSOR = np.full(config.INPUT_SHAPE, 0.5, dtype=np.float32)
# Where the table says peers are: a documentation address (RFC 5737), never dialled; the
# memory transport finds a peer by its id.
NOWHERE = "192.0.2.1"

Reply = InferReply | ItemError
Behaviour = Callable[["FakePeer", InferRequest], Awaitable[Reply]]
Signer = Callable[["FakePeer", Sequence[Reply]], ReplyBatch]


def spec(name: str, *, acc: float = 0.9, macs: int = 1000, latency_ms: float = 0.1) -> ModelSpec:
    return ModelSpec(
        name=name,
        role="variant",
        file=Path(f"/nonexistent/{name}.onnx"),
        sha256=hashlib.sha256(name.encode()).hexdigest(),
        params=100,
        macs=macs,
        resolution=28,
        width=0.25,
        val_accuracy=acc,
        test_accuracy=acc,
        latency_ms=latency_ms,
    )


def manifest_of(*specs: ModelSpec) -> Manifest:
    return Manifest(
        path=Path("/nonexistent/manifest.json"), class_names=tuple(CLASS_NAMES), models=specs
    )


def probs(top: dict[int, float]) -> npt.NDArray[np.float32]:
    """A softmax-like vector with the given classes; the rest of the mass spread evenly."""
    p = np.zeros(config.NUM_CLASSES)
    rest = [c for c in range(config.NUM_CLASSES) if c not in top]
    p[rest] = (1.0 - sum(top.values())) / len(rest)
    for cls, value in top.items():
        p[cls] = value
    return p.astype(np.float32)


def reply_for(peer: FakePeer, req: InferRequest, top: dict[int, float], **kw: object) -> InferReply:
    """``peer``'s reply to ``req`` naming ``top``, as its model would give it."""
    fields: dict[str, object] = {
        "responder_id": peer.peer_id,
        "variant": peer.spec.name,
        "model_sha256": peer.spec.sha256,
        "probs": probs(top),
        "infer_us": 50,
    }
    fields.update(kw)
    return codec.build_reply(req, **fields)  # type: ignore[arg-type]


# --- behaviours: how a fake peer answers one ask -----------------------------------------


def says(top: dict[int, float]) -> Behaviour:
    """An honest peer whose model outputs ``top``."""

    async def behave(peer: FakePeer, req: InferRequest) -> Reply:
        return reply_for(peer, req, top)

    return behave


def hangs(then: dict[int, float]) -> Behaviour:
    """A peer that answers only once the test sets its ``release`` event."""

    async def behave(peer: FakePeer, req: InferRequest) -> Reply:
        await peer.release.wait()
        return reply_for(peer, req, then)

    return behave


def slow(seconds: float, top: dict[int, float]) -> Behaviour:
    """Answer honestly after a fixed delay (a slower device)."""

    async def behave(peer: FakePeer, req: InferRequest) -> Reply:
        await asyncio.sleep(seconds)
        return reply_for(peer, req, top)

    return behave


async def stale(peer: FakePeer, req: InferRequest) -> Reply:
    return reply_for(peer, req, {7: 1.0}, now_ms=unix_ms() - 10 * 60_000)


async def other_request(peer: FakePeer, req: InferRequest) -> Reply:
    # A genuine reply of this peer, to a request it was never sent.
    return reply_for(peer, dataclasses.replace(req, request_id="f" * 32), {7: 1.0})


async def wrong_variant(peer: FakePeer, req: InferRequest) -> Reply:
    return reply_for(peer, req, {7: 1.0}, variant="Vx", model_sha256="0" * 64)


async def malformed(peer: FakePeer, req: InferRequest) -> Reply:
    # Bytes that do not decode as a reply: 0xc1 is the one byte msgpack never uses.
    return dataclasses.replace(reply_for(peer, req, {7: 1.0}), raw=b"\xc1")


async def unavailable(peer: FakePeer, req: InferRequest) -> Reply:
    """A peer that refuses the ask, as one over its cap of asks in flight does."""
    return ItemError(req.request_id, OVERLOADED, "this peer has too many asks in flight")


# --- signers: how a fake peer signs a group of replies -----------------------------------


def flipped(peer: FakePeer, items: Sequence[Reply]) -> ReplyBatch:
    """Its own signature, one bit of it wrong."""
    batch = codec.sign_replies(peer.identity, items)
    forged = bytes([batch.signature[0] ^ 1]) + batch.signature[1:]
    return dataclasses.replace(batch, signature=forged)


def zeroed(peer: FakePeer, items: Sequence[Reply]) -> ReplyBatch:
    """No real signature at all: 64 zero bytes."""
    return dataclasses.replace(codec.sign_replies(peer.identity, items), signature=bytes(64))


def stranger(peer: FakePeer, items: Sequence[Reply]) -> ReplyBatch:
    """Signed with a key the peer did not announce."""
    batch = codec.sign_replies(Identity.generate(), items)
    return dataclasses.replace(batch, responder_id=peer.peer_id)


class _NoModel:
    """A fake peer's model: its behaviour answers instead."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    async def infer(self, x: npt.NDArray[np.float32]) -> object:
        raise AssertionError("a fake peer's behaviour answers, not its model")


class FakePeer(Answerer):
    """A peer's answers to a link's asks: each made by ``behaviour``, each group signed by
    ``signer`` (its own key, honestly, when None). Records every ask and group it gets."""

    def __init__(
        self,
        spec: ModelSpec,
        identity: Identity,
        *,
        family: str,
        behaviour: Behaviour,
        signer: Signer | None = None,
    ) -> None:
        super().__init__(
            identity, _NoModel(spec), swarm=SWARM, family=family, input_shape=config.INPUT_SHAPE
        )
        self.spec = spec
        self.behaviour = behaviour
        self.signer = signer
        self.asks: list[Ask] = []  # every ask received, in order
        self.groups: list[list[str]] = []  # the request ids of each group of asks received
        self.received = asyncio.Event()  # set when an ask arrives
        self.grouped = asyncio.Event()  # set when a group of more than one ask arrives
        self.release = asyncio.Event()  # lets a peer that ``hangs`` answer

    @property
    def group_sizes(self) -> list[int]:
        return [len(g) for g in self.groups]

    async def answer(self, requester_id: str, asks: Sequence[Ask]) -> ReplyBatch:
        self.groups.append([a.request_id for a in asks])
        if len(asks) > 1:
            self.grouped.set()
        return await super().answer(requester_id, asks)

    async def answer_one(self, requester_id: str, ask: Ask) -> Reply:
        self.asks.append(ask)
        self.received.set()
        request = self.request_of(requester_id, ask)
        return await self.behaviour(self, request)

    def sign(self, items: Sequence[Reply]) -> ReplyBatch:
        return super().sign(items) if self.signer is None else self.signer(self, items)


class CountingTransport(MemoryTransport):
    """A requester's links to a ``MemoryNetwork``: counted by peer, its probes of suspected
    peers recorded, and a bug planted in ``link`` for the peers in ``bugged``."""

    def __init__(self, network: MemoryNetwork, link_config: LinkConfig) -> None:
        super().__init__(network, link_config, open_timeout_s=1.0)
        self.opened: collections.Counter[str] = collections.Counter()  # links, by peer id
        self.probed = asyncio.Event()  # set by every probe of a suspected peer
        self.bugged: set[str] = set()

    async def link(self, record: PeerRecord) -> ClientLink:
        if record.peer_id in self.bugged:
            raise RuntimeError("a bug")
        return await super().link(record)

    async def connect(self, record: PeerRecord) -> ClientLink:
        link = await super().connect(record)
        self.opened[record.peer_id] += 1
        return link

    async def healthy(self, record: PeerRecord) -> bool:
        self.probed.set()
        return await super().healthy(record)


def announce(
    table: PeerTable, identity: Identity, spec: ModelSpec, *, family: str, **kw: object
) -> None:
    """Put a serving peer of ``family`` in ``table`` as the mDNS browser would."""
    fields: dict[str, object] = {
        "swarm": SWARM,
        "peer_id": identity.peer_id,
        "public_key": identity.public_key,
        "role": "peer",
        "port": 9,
        "variant": spec.name,
        "model_sha256": spec.sha256,
        "macs": spec.macs,
        "accuracy": spec.val_accuracy,
        "family": family,
    }
    fields.update(kw)
    ann = Announcement(**fields)  # type: ignore[arg-type]
    txt = {k.encode(): v.encode() for k, v in ann.txt().items()}
    assert table.offer(f"{identity.peer_id}.{config.SERVICE_TYPE}", txt, [NOWHERE], 9)


class Clock:
    """The peer table's clock: monotonic time, moved on by ``skip`` (a back-off passing)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def skip(self, seconds: float) -> None:
        self.offset += seconds


class Rig:
    """Fake peers on one memory network, the requester's table and books, and
    requesters over them."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.family = manifest.family_id
        self.clock = Clock()
        self.table = PeerTable(SWARM, timings=TIMINGS, clock=self.clock)
        self.identity = Identity.generate()
        self.reputation = ReputationBook()
        self.metrics = Metrics()
        self.network = MemoryNetwork()
        self.peers: list[FakePeer] = []
        self.requesters: list[Requester] = []

    def guard(self, identity: Identity) -> HelloGuard:
        return HelloGuard(
            identity,
            swarm=SWARM,
            family=self.family,
            trust=TrustStore.open(),
            freshness_s=TIMINGS.freshness_s,
            max_asks=config.MAX_LINK_ASKS,
        )

    def peer(
        self,
        variant: str,
        /,
        behaviour: Behaviour,
        *,
        identity: Identity | None = None,
        signer: Signer | None = None,
        impostor: bool = False,
        reachable: bool = True,
        cls: type[FakePeer] = FakePeer,
        **announced: object,
    ) -> FakePeer:
        """A peer serving ``variant`` as ``behaviour`` says, announced in the table. An
        ``impostor`` peer's links are answered by someone else, under its own key."""
        model = self.manifest.get(variant)
        peer = cls(
            model,
            identity or Identity.generate(),
            family=self.family,
            behaviour=behaviour,
            signer=signer,
        )
        self.peers.append(peer)
        served = peer
        if impostor:
            served = cls(model, Identity.generate(), family=self.family, behaviour=behaviour)
        self.network.peers[peer.peer_id] = MemoryPeer(
            self.guard(served.identity), served, reachable=reachable
        )
        announce(self.table, peer.identity, model, **({"family": self.family} | announced))
        return peer

    def requester(self, *, timings: Timings = TIMINGS, **kw: object) -> Requester:
        link_config = LinkConfig(self.identity, SWARM, self.family, timings.freshness_s)
        fields: dict[str, object] = {
            "identity": self.identity,
            "swarm": SWARM,
            "table": self.table,
            "manifest": self.manifest,
            "trust": TrustStore.open(),
            "reputation": self.reputation,
            "timings": timings,
            "metrics": self.metrics,
            "transport": CountingTransport(self.network, link_config),
        }
        fields.update(kw)
        requester = Requester(**fields)  # type: ignore[arg-type]
        self.requesters.append(requester)
        return requester

    async def aclose(self) -> None:
        for requester in self.requesters:
            await requester.aclose()
        await self.network.aclose()


def transport_of(requester: Requester) -> CountingTransport:
    transport = requester.transport
    assert isinstance(transport, CountingTransport)
    return transport
