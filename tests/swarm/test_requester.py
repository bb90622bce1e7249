"""Tests of swarm.requester (requester and fanout) against fake peers: real aiohttp servers.

Each fake peer is an HTTP server on 127.0.0.1 (port 0) that answers POST /v1/infer with
a reply signed by its own key, or misbehaves as told. Peers enter the requester's peer
table through ``PeerTable.offer``, as the mDNS browser would put them there; no mDNS is
needed here. Timings are shrunk rather than slept through; a peer that "hangs" waits on
an event the test controls.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from aiohttp import web
from structlog.testing import capture_logs

import swarm.requester.requester as requester_module
from swarm import config
from swarm.config import Timings
from swarm.crypto.identity import Identity, TrustStore, verify_signature
from swarm.crypto.session import MAC_HEADER, SESSION_HEADER, SESSION_PATH, SessionTable
from swarm.decision.reputation import PRIOR_SCORE, ReputationBook
from swarm.discovery.mdns import Announcement, PeerRecord, PeerTable
from swarm.errors import ConfigError, NoDecisionError
from swarm.inference.engine import InferenceResult, Manifest, ModelSpec
from swarm.metrics import Metrics
from swarm.requester.fanout import Answer
from swarm.requester.requester import ClassifyResult, LocalInfer, Policy, Requester
from swarm.wire import codec as wire
from tests.swarm.conftest import CLASS_NAMES

SWARM = "test-swarm"
# No hedging unless a test asks for it; deadlines are passed per call.
TIMINGS = Timings(hedge_after_s=30.0, deadline_s=2.0)
TENSOR = np.full(config.INPUT_SHAPE, 0.5, dtype=np.float32)
ALL_AT_ONCE = Policy(wave=None)  # every ballot asked at once, however busy the requester

Behaviour = Callable[["FakePeer", wire.InferRequest], Awaitable[web.Response]]


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


def reply_for(
    peer: FakePeer, req: wire.InferRequest, top: dict[int, float], **kw: object
) -> wire.InferReply:
    fields: dict[str, object] = {
        "variant": peer.spec.name,
        "model_sha256": peer.spec.sha256,
        "probs": probs(top),
        "infer_us": 50,
    }
    fields.update(kw)
    return wire.build_reply(peer.identity, req, **fields)  # type: ignore[arg-type]


def respond(reply: wire.InferReply) -> web.Response:
    return web.Response(body=wire.encode_reply(reply), content_type="application/json")


def says(top: dict[int, float]) -> Behaviour:
    """An honest peer whose model outputs ``top``."""

    async def behave(peer: FakePeer, req: wire.InferRequest) -> web.Response:
        return respond(reply_for(peer, req, top))

    return behave


def hangs(then: dict[int, float]) -> Behaviour:
    """A peer that answers only once the test sets its ``release`` event."""

    async def behave(peer: FakePeer, req: wire.InferRequest) -> web.Response:
        await peer.release.wait()
        return respond(reply_for(peer, req, then))

    return behave


async def bad_signature(peer: FakePeer, req: wire.InferRequest) -> web.Response:
    reply = reply_for(peer, req, {3: 0.9})
    forged = bytes([reply.signature[0] ^ 1]) + reply.signature[1:]
    return respond(dataclasses.replace(reply, signature=forged))


async def other_key(peer: FakePeer, req: wire.InferRequest) -> web.Response:
    # Claims to be the peer asked, but signed with a key it did not announce.
    stranger = Identity.generate()
    reply = dataclasses.replace(reply_for(peer, req, {3: 0.9}), responder_id=peer.identity.peer_id)
    return respond(dataclasses.replace(reply, signature=stranger.sign(reply.signed_bytes())))


async def impostor(peer: FakePeer, req: wire.InferRequest) -> web.Response:
    # Someone else answers at the peer's address, under its own name and key.
    stranger = Identity.generate()
    reply = wire.build_reply(
        stranger,
        req,
        variant=peer.spec.name,
        model_sha256=peer.spec.sha256,
        probs=probs({7: 1.0}),
        infer_us=1,
    )
    return respond(reply)


async def stale(peer: FakePeer, req: wire.InferRequest) -> web.Response:
    return respond(reply_for(peer, req, {7: 1.0}, now_ms=wire.unix_ms() - 10 * 60_000))


async def other_request(peer: FakePeer, req: wire.InferRequest) -> web.Response:
    # A genuine reply of this peer, to a request it was never sent.
    return respond(reply_for(peer, dataclasses.replace(req, request_id="f" * 32), {7: 1.0}))


async def wrong_variant(peer: FakePeer, req: wire.InferRequest) -> web.Response:
    return respond(reply_for(peer, req, {7: 1.0}, variant="Vx", model_sha256="0" * 64))


async def malformed(peer: FakePeer, req: wire.InferRequest) -> web.Response:
    return web.Response(body=b'{"version": 1', content_type="application/json")


async def unavailable(peer: FakePeer, req: wire.InferRequest) -> web.Response:
    return web.json_response({"error": "overloaded"}, status=503)


class FakePeer:
    """A peer's HTTP side: POST /v1/infer answered by ``behaviour``."""

    def __init__(self, spec: ModelSpec, behaviour: Behaviour, identity: Identity) -> None:
        self.spec = spec
        self.behaviour = behaviour
        self.identity = identity
        self.bodies: list[bytes] = []
        self.batches: list[int] = []  # sizes of the batches received
        self.batch_ids: list[list[str]] = []  # the request ids of each batch received
        self.batch_signer: Identity | None = None  # sign reply batches with another key
        # Answers a whole batch itself instead of item by item through ``behaviour``.
        self.batch_behaviour: (
            Callable[[FakePeer, wire.InferBatch], Awaitable[wire.ReplyBatch]] | None
        ) = None
        self.probed = 0  # GET /healthz calls
        # With a table, the peer opens sessions and checks and seals MACs (swarm.crypto.session).
        self.sessions: SessionTable | None = None
        self.hellos = 0  # session offers received
        self.in_session = 0  # requests that came with a valid session MAC
        self.bad_mac = False  # seal replies with a wrong MAC
        self.batch_signatures: list[bytes] = []  # of the request batches received
        self.received = asyncio.Event()  # set when the first request arrives
        self.batch_arrived = asyncio.Event()  # set when the first batch arrives
        self.release = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/infer", self._handle)
        app.router.add_post("/v1/infer/batch", self._handle_batch)
        app.router.add_get("/healthz", self._health)
        if self.sessions is not None:
            app.router.add_post(SESSION_PATH, self._session)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _health(self, _request: web.Request) -> web.Response:
        self.probed += 1
        return web.json_response({"status": "ok"})

    async def _session(self, request: web.Request) -> web.Response:
        assert self.sessions is not None
        self.hellos += 1
        hello = wire.decode_hello(await request.read())
        welcome = self.sessions.open(hello, now_ms=wire.unix_ms())
        return web.Response(body=wire.encode_welcome(welcome), content_type="application/json")

    async def _sealed(
        self, request: web.Request, answer: Callable[[bytes], Awaitable[web.Response]]
    ) -> web.Response:
        """``answer`` to the body, with the session MAC checked and the answer sealed when
        the request names a session (as ``swarm.http.api`` does)."""
        body = await request.read()
        session_id = request.headers.get(SESSION_HEADER)
        if session_id is None:
            return await answer(body)
        held = None if self.sessions is None else self.sessions.get(session_id)
        if held is None:
            return web.json_response({"error": "unknown_session", "message": "?"}, status=401)
        mac = base64.b64decode(request.headers[MAC_HEADER])
        assert mac == held.keys.request_mac(request.path, body)
        self.in_session += 1
        response = await answer(body)
        assert isinstance(response.body, bytes)
        seal = held.keys.reply_mac(mac, response.status, response.body)
        if self.bad_mac:
            seal = bytes(len(seal))
        response.headers[MAC_HEADER] = base64.b64encode(seal).decode()
        return response

    async def _handle(self, request: web.Request) -> web.Response:
        return await self._sealed(request, self._answer)

    async def _answer(self, body: bytes) -> web.Response:
        self.bodies.append(body)
        self.received.set()
        return await self.behaviour(self, wire.decode_request(body))

    async def _handle_batch(self, request: web.Request) -> web.Response:
        return await self._sealed(request, self._answer_batch)

    async def _answer_batch(self, body: bytes) -> web.Response:
        # Each item as its behaviour answers it alone; the replies signed as one batch.
        batch = wire.decode_batch(body)
        if self.sessions is None:  # outside a session a batch must be signed
            signed = batch.requester_key, batch.signature, batch.signed_bytes()
            assert verify_signature(*signed)
        self.batch_signatures.append(batch.signature)
        self.batches.append(len(batch.items))
        self.batch_ids.append([r.request_id for r in batch.items])
        self.received.set()
        self.batch_arrived.set()
        if self.batch_behaviour is not None:
            own = await self.batch_behaviour(self, batch)
            return web.Response(body=wire.encode_reply_batch(own), content_type="application/json")
        answers = await asyncio.gather(*(self.behaviour(self, r) for r in batch.items))
        replies = [wire.decode_reply(a.body) for a in answers]  # type: ignore[arg-type]
        signed = wire.sign_replies(self.batch_signer or self.identity, replies)
        if self.batch_signer is not None:
            signed = dataclasses.replace(signed, responder_id=self.identity.peer_id)
        return web.Response(body=wire.encode_reply_batch(signed), content_type="application/json")

    async def aclose(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()


def announce(
    table: PeerTable, identity: Identity, spec: ModelSpec, port: int, **kw: object
) -> None:
    """Put a serving peer in ``table`` as the mDNS browser would."""
    fields: dict[str, object] = {
        "swarm": SWARM,
        "peer_id": identity.peer_id,
        "public_key": identity.public_key,
        "role": "peer",
        "port": port,
        "variant": spec.name,
        "model_sha256": spec.sha256,
        "macs": spec.macs,
        "accuracy": spec.val_accuracy,
    }
    fields.update(kw)
    ann = Announcement(**fields)  # type: ignore[arg-type]
    txt = {k.encode(): v.encode() for k, v in ann.txt().items()}
    assert table.offer(f"{identity.peer_id}.{config.SERVICE_TYPE}", txt, ["127.0.0.1"], port)


class Rig:
    """Fake peers, the requester's table and books, and requesters over them."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.table = PeerTable(SWARM, timings=TIMINGS)
        self.identity = Identity.generate()
        self.reputation = ReputationBook()
        self.metrics = Metrics()
        self.peers: list[FakePeer] = []
        self.requesters: list[Requester] = []

    async def peer(
        self,
        variant: str,
        behaviour: Behaviour,
        /,
        *,
        identity: Identity | None = None,
        sessions: bool = False,
        **announced: object,
    ) -> FakePeer:
        peer = FakePeer(self.manifest.get(variant), behaviour, identity or Identity.generate())
        if sessions:
            peer.sessions = SessionTable(
                peer.identity, swarm=SWARM, trust=TrustStore.open(), freshness_s=30.0
            )
        self.peers.append(peer)
        await peer.start()
        announce(self.table, peer.identity, peer.spec, peer.port, **announced)
        return peer

    def requester(self, *, timings: Timings = TIMINGS, **kw: object) -> Requester:
        fields: dict[str, object] = {
            "identity": self.identity,
            "swarm": SWARM,
            "table": self.table,
            "manifest": self.manifest,
            "trust": TrustStore.open(),
            "reputation": self.reputation,
            "timings": timings,
            "metrics": self.metrics,
        }
        fields.update(kw)
        requester = Requester(**fields)  # type: ignore[arg-type]
        self.requesters.append(requester)
        return requester

    async def aclose(self) -> None:
        for requester in self.requesters:
            await requester.aclose()
        for peer in self.peers:
            await peer.aclose()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """Three variants V1-V3 of equal accuracy; no peers yet."""
    r = Rig(manifest_of(spec("V1"), spec("V2"), spec("V3")))
    yield r
    await r.aclose()


@pytest.fixture
async def rig7() -> AsyncIterator[Rig]:
    """Seven variants V1-V7 of equal accuracy; no peers yet."""
    r = Rig(manifest_of(*(spec(f"V{i}") for i in range(1, 8))))
    yield r
    await r.aclose()


def rejections(rig: Rig, reason: str) -> float | None:
    return rig.metrics.registry.get_sample_value("vswarm_rejections_total", {"reason": reason})


async def classify(requester: Requester, **kw: object) -> ClassifyResult:
    # Every test is bounded: a call that overruns its deadline fails instead of hanging.
    async with asyncio.timeout(10):
        return await requester.classify(TENSOR, **kw)  # type: ignore[arg-type]


# --- the happy path ----------------------------------------------------------------------


async def test_happy_path_decides_with_every_variant(rig: Rig) -> None:
    """Three honest peers: the label they share, every reply listed, a certificate."""
    peers = [await rig.peer(v, says({3: 0.8, 1: 0.1})) for v in ("V1", "V2", "V3")]
    result = await classify(rig.requester(), quorum=3)  # no early exit: all three count
    assert (result.label, result.class_name, result.rule) == (3, "Dress", "robust")
    assert {r.peer for r in result.replies} == {p.peer_id for p in peers}
    assert {r.variant for r in result.replies} == {"V1", "V2", "V3"}
    assert result.replies[0].topk == ((3, 0.8), (1, 0.1))
    assert result.rejected == ()
    assert result.missing == result.skipped == ()
    assert result.certified_f >= 1
    assert 0.0 < result.confidence <= 1.0
    assert result.latency_ms > 0


async def test_request_is_signed_and_encoded_once(rig: Rig) -> None:
    """Every peer receives the same bytes: one signed request for the whole call."""
    peers = [await rig.peer(v, says({3: 0.8})) for v in ("V1", "V2", "V3")]
    await classify(rig.requester(), quorum=3)
    bodies = {p.bodies[0] for p in peers}
    assert len(bodies) == 1
    request = wire.decode_request(bodies.pop())
    assert request.requester_id == rig.identity.peer_id
    assert request.k == config.DEFAULT_TOP_K


async def test_to_json_has_the_documented_shape(rig: Rig) -> None:
    """to_json carries exactly the documented keys and survives json.dumps."""
    await rig.peer("V1", says({3: 0.8}))
    await rig.peer("V2", unavailable)
    result = await classify(rig.requester(), quorum=1)
    doc = json.loads(json.dumps(result.to_json(image="a.png")))
    assert set(doc) == {
        "image", "class", "label", "confidence", "certified_f", "latency_ms", "rule",
        "replies", "rejected", "missing", "skipped", "wave",
    }  # fmt: skip
    assert (doc["image"], doc["class"], doc["label"]) == ("a.png", 3, "Dress")
    assert doc["wave"] is None  # one call in flight: every ballot asked at once
    assert set(doc["replies"][0]) == {"peer", "variant", "topk", "latency_ms"}
    assert doc["replies"][0]["topk"][0] == [3, 0.8]
    assert doc["missing"] == [rig.peers[1].peer_id]


# --- verification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "reason", "attributable"),
    [
        (bad_signature, "bad_signature", False),
        (other_key, "bad_signature", False),
        (impostor, "wrong_peer", False),
        (stale, "stale", True),
        (other_request, "wrong_binding", True),
        (wrong_variant, "wrong_variant", True),
        (malformed, "malformed", False),
    ],
)
async def test_bad_reply_is_rejected_and_not_counted(
    rig: Rig, behaviour: Behaviour, reason: str, attributable: bool
) -> None:
    """A bad reply is kept with its reason, left out of the vote, and costs its peer."""
    # Two honest replies this unsure cannot decide alone: the third is always awaited.
    await rig.peer("V1", says({3: 0.5, 1: 0.3}))
    await rig.peer("V2", says({3: 0.5, 1: 0.3}))
    bad = await rig.peer("V3", behaviour)
    result = await classify(rig.requester())
    assert result.label == 3
    assert [(r.peer, r.reason) for r in result.rejected] == [(bad.peer_id, reason)]
    assert bad.peer_id not in {r.peer for r in result.replies}
    assert len(result.replies) == 2
    assert rejections(rig, reason) == 1
    record = rig.table.get(bad.peer_id)
    assert record is not None
    if attributable:  # signed by the peer: evidence against it
        assert rig.reputation.score(bad.peer_id) < PRIOR_SCORE
        assert record.failures == 0
    else:  # not provably its own: the address is backed off, the peer's name is not blamed
        assert bad.peer_id not in rig.reputation
        assert record.failures == 1


async def test_replayed_reply_is_rejected(rig: Rig) -> None:
    """A peer replaying the reply it signed for an earlier request is caught."""
    cache: list[wire.InferReply] = []

    async def replays(peer: FakePeer, req: wire.InferRequest) -> web.Response:
        if not cache:
            cache.append(reply_for(peer, req, {3: 0.8}))
        return respond(cache[0])

    await rig.peer("V1", says({3: 0.8}))
    liar = await rig.peer("V2", replays)
    requester = rig.requester()
    first = await classify(requester)
    assert liar.peer_id in {r.peer for r in first.replies}
    second = await classify(requester)
    assert [(r.peer, r.reason) for r in second.rejected] == [(liar.peer_id, "wrong_binding")]


async def test_all_rejected_raises_with_the_reasons(rig: Rig) -> None:
    """Nothing valid: NoDecisionError names the peers asked and why each failed."""
    await rig.peer("V1", bad_signature)
    await rig.peer("V2", unavailable)
    with pytest.raises(
        NoDecisionError, match=r"no counted replies from 2 peers within 500 ms"
    ) as e:
        await classify(rig.requester(), deadline_ms=500)
    assert "bad_signature x1" in str(e.value)
    assert "1 missing" in str(e.value)


# --- sessions ----------------------------------------------------------------------------


async def test_session_opened_once_then_every_request_goes_by_mac(rig: Rig) -> None:
    peers = [await rig.peer(v, says({3: 0.8}), sessions=True) for v in ("V1", "V2", "V3")]
    requester = rig.requester()
    for _ in range(3):
        result = await classify(requester, quorum=3)
        assert (result.label, len(result.replies), result.rejected) == (3, 3, ())
    assert [(p.hellos, p.in_session) for p in peers] == [(1, 3)] * 3


async def test_request_goes_unsigned_only_when_every_peer_is_in_session(rig: Rig) -> None:
    """The first call opens the sessions and signs its request; later calls, whose every
    peer holds a live session, leave it to the MACs. A peer without one brings the
    signature back."""
    peers = [await rig.peer(v, says({3: 0.8}), sessions=True) for v in ("V1", "V2")]
    requester = rig.requester()
    for _ in range(2):
        await classify(requester, quorum=2)
    first, second = (wire.decode_request(b) for b in peers[0].bodies)
    key = rig.identity.public_key
    assert verify_signature(key, first.signature, first.signed_bytes())
    assert second.signature == bytes(64)
    plain = await rig.peer("V3", says({3: 0.8}))
    await classify(requester, quorum=3)
    third = wire.decode_request(plain.bodies[0])
    assert verify_signature(key, third.signature, third.signed_bytes())


async def test_without_sessions_the_requester_signs_and_checks_signatures(rig: Rig) -> None:
    """A peer without the session route, or a requester with sessions off: signatures."""
    old = await rig.peer("V1", says({3: 0.8}))
    new = await rig.peer("V2", says({3: 0.8}), sessions=True)
    result = await classify(rig.requester(), quorum=2)
    assert (len(result.replies), old.in_session, new.in_session) == (2, 0, 1)
    await classify(rig.requester(sessions=False), quorum=2)
    assert (new.hellos, new.in_session) == (1, 1)
    second = await classify(rig.requester(), quorum=2)
    assert len(second.replies) == 2
    assert (new.hellos, new.in_session) == (2, 2)


async def test_dissenting_reply_with_a_bad_signature_is_dropped_against_its_peer(
    rig: Rig,
) -> None:
    """Its MAC proves the peer sent it; it dissents, so its signature is checked before
    the answer, fails, and the ballot is dropped: evidence against that peer."""

    async def forged_dissent(peer: FakePeer, req: wire.InferRequest) -> web.Response:
        reply = reply_for(peer, req, {7: 0.9})
        return respond(dataclasses.replace(reply, signature=bytes(64)))

    await rig.peer("V1", says({3: 0.5, 1: 0.3}), sessions=True)
    await rig.peer("V2", says({3: 0.5, 1: 0.3}), sessions=True)
    liar = await rig.peer("V3", forged_dissent, sessions=True)
    result = await classify(rig.requester(), quorum=2)
    assert result.label == 3
    assert [(r.peer, r.reason) for r in result.rejected] == [(liar.peer_id, "bad_signature")]
    assert liar.peer_id not in {r.peer for r in result.replies}
    assert liar.in_session == 1
    assert rig.reputation.score(liar.peer_id) < PRIOR_SCORE
    record = rig.table.get(liar.peer_id)
    assert record is not None
    assert record.failures == 0


async def test_agreeing_reply_with_a_bad_signature_is_found_by_the_sample(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agreeing reply counts on its MAC; the signature check after the answer (here
    of every reply) finds the bad one and counts it against its peer."""
    monkeypatch.setattr(config, "LATE_SIGNATURE_SAMPLE", 1.0)
    await rig.peer("V1", says({3: 0.8}), sessions=True)
    liar = await rig.peer("V2", bad_signature, sessions=True)  # says 3 with a bad signature
    with capture_logs() as logs:
        result = await classify(rig.requester(), quorum=2)
        assert liar.peer_id in {r.peer for r in result.replies}
        assert liar.peer_id not in rig.reputation
        await asyncio.sleep(0)  # the check runs on the next turn of the loop
    assert [e["peer"] for e in logs if e["event"] == "late_bad_signature"] == [liar.peer_id]
    assert rig.reputation.score(liar.peer_id) < PRIOR_SCORE
    assert rejections(rig, "bad_signature") == 1


async def test_reply_with_a_wrong_mac_is_rejected_as_not_provably_the_peers(rig: Rig) -> None:
    await rig.peer("V1", says({3: 0.5, 1: 0.3}), sessions=True)
    await rig.peer("V2", says({3: 0.5, 1: 0.3}), sessions=True)
    bad = await rig.peer("V3", says({3: 0.5, 1: 0.3}), sessions=True)
    bad.bad_mac = True
    result = await classify(rig.requester())
    assert [(r.peer, r.reason) for r in result.rejected] == [(bad.peer_id, "bad_signature")]
    assert bad.peer_id not in rig.reputation
    record = rig.table.get(bad.peer_id)
    assert record is not None
    assert record.failures == 1


async def test_forgotten_session_is_opened_again(rig: Rig) -> None:
    """A peer that restarted answers unknown_session: the requester opens a new session
    and the call goes through."""
    peer = await rig.peer("V1", says({3: 0.8}), sessions=True)
    requester = rig.requester()
    await classify(requester)
    peer.sessions = SessionTable(
        peer.identity, swarm=SWARM, trust=TrustStore.open(), freshness_s=30.0
    )
    result = await classify(requester)
    assert (result.label, len(result.replies)) == (3, 1)
    assert (peer.hellos, peer.in_session) == (2, 2)


# --- Byzantine peers ---------------------------------------------------------------------


async def test_colluding_liars_do_not_flip_robust(rig7: Rig) -> None:
    """Two of seven peers naming class 7 with 1.0 flip `sum` but not `robust`."""
    for v in ("V1", "V2", "V3", "V4", "V5"):
        await rig7.peer(v, says({3: 0.35, 1: 0.3}))
    for v in ("V6", "V7"):
        await rig7.peer(v, says({7: 1.0}))
    requester = rig7.requester()
    robust = await classify(requester, rule="robust", quorum=7)  # the liars' votes are in
    assert robust.label == 3
    assert len(robust.replies) == 7
    summed = await classify(requester, rule="sum", quorum=7)
    assert summed.label == 7  # the contrast: the paper's rule is flipped


# --- deadlines, failures, hedging, early exit --------------------------------------------


async def test_hung_peer_is_missing_at_the_deadline(rig: Rig) -> None:
    """A peer that never answers: the call decides at its deadline and reports it missing."""
    await rig.peer("V1", says({3: 0.6}))
    await rig.peer("V2", says({5: 0.6}))  # a split vote: the hung peer's reply would matter
    hung = await rig.peer("V3", hangs({3: 0.6}))
    result = await classify(rig.requester(), deadline_ms=300)
    assert result.missing == (hung.peer_id,)
    assert result.skipped == ()
    assert len(result.replies) == 2
    assert 300 <= result.latency_ms < 2000
    record = rig.table.get(hung.peer_id)
    assert record is not None
    assert record.failures == 1  # backed off for the next call


async def test_unreachable_peer_is_missing_and_backed_off(rig: Rig) -> None:
    """A peer whose port refuses connections is reported missing, not fatal."""
    await rig.peer("V1", says({3: 0.8}))
    ghost = Identity.generate()
    dead = FakePeer(rig.manifest.get("V2"), says({3: 0.8}), ghost)
    await dead.start()
    port = dead.port
    await dead.aclose()  # the port is now closed
    announce(rig.table, ghost, rig.manifest.get("V2"), port)
    result = await classify(rig.requester())
    assert result.missing == (ghost.peer_id,)
    record = rig.table.get(ghost.peer_id)
    assert record is not None
    assert record.failures == 1


async def test_hedge_goes_to_a_second_replica(rig: Rig) -> None:
    """A replica that does not answer within hedge_after_s is hedged with the next one."""
    first, second = sorted((Identity.generate(), Identity.generate()), key=lambda i: i.peer_id)
    slow = await rig.peer("V1", hangs({3: 0.8}), identity=first)  # ranked first: lower id
    fast = await rig.peer("V1", says({3: 0.8}), identity=second)
    requester = rig.requester(timings=dataclasses.replace(TIMINGS, hedge_after_s=0.05))
    with capture_logs() as logs:
        result = await classify(requester)
    assert [r.peer for r in result.replies] == [fast.peer_id]
    assert result.skipped == (slow.peer_id,)  # cancelled once its sibling answered
    assert result.missing == ()
    assert len(slow.bodies) == len(fast.bodies) == 1
    assert slow.bodies == fast.bodies
    assert any(e["event"] == "hedge_sent" and e["peer"] == fast.peer_id for e in logs)
    # The cut-off replica now ranks behind the one that answered.
    slow_ms, fast_ms = requester.latency_ms(slow.peer_id), requester.latency_ms(fast.peer_id)
    assert slow_ms is not None
    assert fast_ms is not None
    assert slow_ms > fast_ms


async def test_no_hedge_when_the_first_replica_answers(rig: Rig) -> None:
    """A variant answered in time asks exactly one of its replicas."""
    a = await rig.peer("V1", says({3: 0.8}))
    b = await rig.peer("V1", says({3: 0.8}))
    result = await classify(rig.requester())
    assert len(result.replies) == 1
    assert len(a.bodies) + len(b.bodies) == 1


async def test_failed_replica_fails_over_at_once(rig: Rig) -> None:
    """A replica answering an HTTP error is replaced by the next one without waiting."""
    first, second = sorted((Identity.generate(), Identity.generate()), key=lambda i: i.peer_id)
    broken = await rig.peer("V1", unavailable, identity=first)
    good = await rig.peer("V1", says({3: 0.8}), identity=second)
    result = await classify(rig.requester(), deadline_ms=5000)  # hedge_after_s is 30 s
    assert [r.peer for r in result.replies] == [good.peer_id]
    assert result.missing == (broken.peer_id,)
    assert result.latency_ms < 5000


async def test_early_exit_skips_a_peer_that_cannot_change_the_result(rig: Rig) -> None:
    """Two confident agreeing replies decide; the slow third is cancelled, not awaited."""
    await rig.peer("V1", says({3: 0.9}))
    await rig.peer("V2", says({3: 0.9}))
    slow = await rig.peer("V3", hangs({7: 1.0}))
    async with asyncio.timeout(3):  # far below the 30 s deadline given to the call
        result = await rig.requester().classify(TENSOR, deadline_ms=30_000)
    assert result.label == 3
    assert result.skipped == (slow.peer_id,)
    assert result.missing == ()
    record = rig.table.get(slow.peer_id)
    assert record is not None
    assert record.failures == 0  # not its fault: it was not needed


async def test_no_early_exit_before_quorum(rig: Rig) -> None:
    """With quorum 3, two agreeing replies are not enough: the call waits for the third."""
    await rig.peer("V1", says({3: 0.9}))
    await rig.peer("V2", says({3: 0.9}))
    late = await rig.peer("V3", hangs({3: 0.9}))
    requester = rig.requester()
    task = asyncio.create_task(classify(requester, quorum=3, deadline_ms=5000))
    await late.received.wait()
    await asyncio.sleep(0.05)  # time enough for a wrong early exit on the other two
    assert not task.done()
    late.release.set()
    result = await task
    assert len(result.replies) == 3


async def test_quorum_not_met_raises(rig: Rig) -> None:
    """Fewer valid replies than the quorum by the deadline: NoDecisionError."""
    await rig.peer("V1", says({3: 0.9}))
    await rig.peer("V2", unavailable)
    with pytest.raises(NoDecisionError, match=r"quorum not met \(1 counted replies, 2 required\)"):
        await classify(rig.requester(), quorum=2, deadline_ms=500)


async def test_quorum_above_the_variants_fails_fast(rig: Rig) -> None:
    """A quorum no set of peers can meet is refused before anything is sent."""
    peer = await rig.peer("V1", says({3: 0.9}))
    with pytest.raises(NoDecisionError, match="quorum 2 cannot be met"):
        await classify(rig.requester(), quorum=2)
    assert peer.bodies == []


async def test_no_peers_raises(rig: Rig) -> None:
    """An empty peer table: NoDecisionError at once, saying nobody serves a variant."""
    with pytest.raises(NoDecisionError, match="no peer serves a variant"):
        await classify(rig.requester())


# --- peer choice -------------------------------------------------------------------------


async def test_peers_with_unknown_models_or_keys_are_not_asked(rig: Rig) -> None:
    """Unknown model hash, unknown variant, or a key off the allow-list: never asked."""
    good = await rig.peer("V1", says({3: 0.9}))
    wrong_hash = await rig.peer("V2", says({7: 1.0}), model_sha256="ab" * 32)
    unknown = await rig.peer("V3", says({7: 1.0}), variant="Vzz")
    untrusted = await rig.peer("V3", says({7: 1.0}))
    trust = TrustStore.from_keys([good.identity.public_key, unknown.identity.public_key])
    requester = rig.requester(trust=trust)
    assert requester.available_variants() == {"V1"}
    result = await classify(requester)
    assert [r.peer for r in result.replies] == [good.peer_id]
    assert wrong_hash.bodies == unknown.bodies == untrusted.bodies == []


async def test_policy_variants_and_budgets(rig: Rig) -> None:
    """A policy narrows the variants: a named set, a MACs budget, a latency budget."""
    cheap = Rig(
        manifest_of(
            spec("V1", acc=0.90, macs=500),
            spec("V2", acc=0.92, macs=800),
            spec("V3", acc=0.88, macs=400),
        )
    )
    try:
        peers = {v: await cheap.peer(v, says({3: 0.9})) for v in ("V1", "V2", "V3")}
        requester = cheap.requester()
        named = await classify(requester, policy=Policy(variants=("V1", "V3")))
        assert {r.variant for r in named.replies} == {"V1", "V3"}
        # Most accurate first: V2 (800) fits, V1 (500) would not, V3 (400) does.
        budget = requester.available_variants(Policy(max_macs=1250))
        assert budget == {"V2", "V3"}
        # Never asked, V1 and V3 are judged by the manifest's 0.1 ms.
        fresh = cheap.requester()
        fresh.observe_latency(peers["V2"].peer_id, 80.0)
        fast = fresh.available_variants(Policy(latency_budget_ms=50.0))
        assert fast == {"V1", "V3"}
        with pytest.raises(ConfigError, match="no model named 'V9'"):
            requester.available_variants(Policy(variants=("V9",)))
    finally:
        await cheap.aclose()


async def test_excluded_peer_is_asked_only_when_nothing_else_serves(rig: Rig) -> None:
    """A replica excluded by reputation ranks behind any other replica of its variant."""
    bad_id, good_id = sorted((Identity.generate(), Identity.generate()), key=lambda i: i.peer_id)
    for _ in range(30):
        rig.reputation.record(bad_id.peer_id, agreed=False)
    assert rig.reputation.is_excluded(bad_id.peer_id)
    excluded = await rig.peer("V1", says({3: 0.9}), identity=bad_id)
    other = await rig.peer("V1", says({3: 0.9}), identity=good_id)
    result = await classify(rig.requester())
    assert [r.peer for r in result.replies] == [other.peer_id]
    assert excluded.bodies == []


async def test_local_replica_is_asked_in_process(rig: Rig) -> None:
    """The requester's own variant is served by LocalInfer, never over HTTP."""

    class Model:
        def __init__(self, spec: ModelSpec) -> None:
            self.spec = spec
            self.calls = 0

        async def infer(self, x: npt.NDArray[np.float32]) -> InferenceResult:
            self.calls += 1
            assert x.shape == config.INPUT_SHAPE
            return InferenceResult(probs=probs({3: 0.9}), seconds=0.0001, batch_size=1)

    model = Model(rig.manifest.get("V1"))
    # Its announced port is closed: an HTTP ask would fail and show up as missing.
    announce(rig.table, rig.identity, model.spec, 9)
    await rig.peer("V2", says({3: 0.9}))
    result = await classify(rig.requester(local=LocalInfer(model)))
    assert model.calls == 1
    assert rig.identity.peer_id in {r.peer for r in result.replies}
    assert result.missing == ()


# --- learning ----------------------------------------------------------------------------


async def test_reputation_recorded_from_certified_decisions(rig7: Rig) -> None:
    """A clear decision records agreement for every ballot; the dissenter scores lower."""
    agreeing = [await rig7.peer(v, says({3: 0.9})) for v in ("V1", "V2", "V3", "V4")]
    dissent = await rig7.peer("V5", says({5: 0.9}))
    result = await classify(rig7.requester(), quorum=5)
    assert result.certified_f >= 1
    for peer in agreeing:
        assert rig7.reputation.observations(peer.peer_id) == pytest.approx(1.0, rel=1e-3)
        assert rig7.reputation.score(peer.peer_id) > PRIOR_SCORE
    assert rig7.reputation.score(dissent.peer_id) < PRIOR_SCORE
    votes = rig7.metrics.registry.get_sample_value("vswarm_votes_total", {"rule": "robust"})
    assert votes == 1


async def test_near_tie_records_no_reputation(rig: Rig) -> None:
    """A decision one reply could flip (certified_f 0) punishes nobody."""
    await rig.peer("V1", says({3: 0.6}))
    await rig.peer("V2", says({5: 0.6}))
    result = await classify(rig.requester())
    assert result.certified_f == 0
    assert len(rig.reputation) == 0


# --- arguments and lifecycle -------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{"rule": "mean"}, {"k": 0}, {"k": 11}, {"quorum": 0}, {"deadline_ms": 0}],
)
async def test_bad_arguments_are_config_errors(rig: Rig, kw: dict[str, object]) -> None:
    """Bad call arguments raise ConfigError before anything is sent."""
    peer = await rig.peer("V1", says({3: 0.9}))
    with pytest.raises(ConfigError):
        await classify(rig.requester(), **kw)
    assert peer.bodies == []


async def test_aclose_is_idempotent_and_final(rig: Rig) -> None:
    """aclose twice is fine; a closed requester refuses to classify."""
    await rig.peer("V1", says({3: 0.9}))
    async with rig.requester() as requester:
        await classify(requester)
    await requester.aclose()
    with pytest.raises(ConfigError, match="closed"):
        await classify(requester)


# --- replicas, stragglers, recovery ------------------------------------------------------


def slow(seconds: float, top: dict[int, float]) -> Behaviour:
    """Answer honestly after a fixed delay (a slower device)."""

    async def behave(peer: FakePeer, req: wire.InferRequest) -> web.Response:
        await asyncio.sleep(seconds)
        return respond(reply_for(peer, req, top))

    return behave


async def test_replicas_all_asks_every_peer(rig: Rig) -> None:
    """Policy(replicas=None) gets one ballot per peer; the default one per variant."""
    for v in ("V1", "V1", "V2"):
        await rig.peer(v, says({3: 0.8}))
    requester = rig.requester()
    one_each = await classify(requester, quorum=2)
    assert sorted(r.variant for r in one_each.replies) == ["V1", "V2"]
    every = await classify(requester, quorum=3, policy=Policy(replicas=None))
    assert sorted(r.variant for r in every.replies) == ["V1", "V1", "V2"]
    assert len({r.peer for r in every.replies}) == 3


async def test_replicas_all_outvotes_liars_that_hold_most_variants(rig7: Rig) -> None:
    """Three liars, each the only copy of its variant, flip a per-variant vote, not per-peer."""
    for v in ("V1", "V2", "V3"):
        await rig7.peer(v, says({7: 1.0}))
    for v in ("V4", "V4", "V5", "V5"):
        await rig7.peer(v, says({3: 0.9, 1: 0.05}))
    requester = rig7.requester()
    per_variant = await classify(requester, quorum=5)
    assert per_variant.label == 7  # 3 of the 5 ballots lie: no rule can hold that
    per_peer = await classify(requester, quorum=7, policy=Policy(replicas=None))
    assert per_peer.label == 3
    assert len(per_peer.replies) == 7


async def test_straggler_cut_off_by_early_exit_is_backed_off(rig: Rig) -> None:
    """A peer still silent past the hedge delay, when its siblings and the replica the
    hedge asked answered quickly, is backed off once the call is decided without it."""
    hung = await rig.peer("V1", hangs({3: 0.8}))
    backup = await rig.peer("V1", slow(0.01, {3: 0.8}))  # the replica the hedge goes to
    # A split vote: the call waits for V1, so the hedge fires.
    await rig.peer("V2", slow(0.01, {3: 0.9}))
    await rig.peer("V3", slow(0.01, {5: 0.9}))
    requester = rig.requester(timings=dataclasses.replace(TIMINGS, hedge_after_s=0.05))
    requester.observe_latency(backup.peer_id, 500.0)  # ranked second: asked by the hedge
    result = await classify(requester)
    assert result.skipped == (hung.peer_id,)
    record = rig.table.get(hung.peer_id)
    assert record is not None
    assert record.failures == 1
    assert hung.peer_id not in {r.peer_id for r in rig.table.candidates()}


async def test_peer_as_slow_as_its_siblings_is_not_backed_off(rig: Rig) -> None:
    """Under load every reply is slow: a peer cut off past the hedge delay, but no slower
    than the replies that were counted, is not taken for a straggler."""
    await rig.peer("V1", slow(0.12, {3: 0.9}))
    await rig.peer("V2", slow(0.12, {3: 0.9}))
    await rig.peer("V3", slow(0.16, {3: 0.9}))  # a little slower: cut off by early exit
    requester = rig.requester(timings=dataclasses.replace(TIMINGS, hedge_after_s=0.05))
    result = await classify(requester)
    assert len(result.skipped) == 1
    record = rig.table.get(result.skipped[0])
    assert record is not None
    assert record.failures == 0


async def test_fast_sibling_skipped_in_time_is_not_backed_off(rig: Rig) -> None:
    """Early exit before the hedge delay does not count against the peers it cut off."""
    await rig.peer("V1", says({3: 0.9}))
    await rig.peer("V2", says({3: 0.9}))
    await rig.peer("V3", slow(0.5, {3: 0.9}))
    result = await classify(rig.requester())  # hedge_after_s is 30 s
    assert all((r := rig.table.get(p)) is not None and r.failures == 0 for p in result.skipped)


async def test_a_bug_in_one_ask_costs_its_reply_not_the_call(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ask that fails with an exception no SwarmError (a bug) leaves its peer
    missing; the other replies decide the call. Uncoalesced, so the exception reaches the
    fan-out itself (a coalesced batch turns it into an InferenceError of its own)."""
    broken = await rig.peer("V1", says({3: 0.9}))
    await rig.peer("V2", says({3: 0.9}))
    await rig.peer("V3", says({3: 0.9}))
    requester = rig.requester(coalesce=False)
    ask_one = requester._ask_one

    async def buggy(record: PeerRecord, request: wire.InferRequest, body: bytes) -> Answer:
        if record.peer_id == broken.peer_id:
            raise RuntimeError("a bug")
        return await ask_one(record, request, body)

    monkeypatch.setattr(requester, "_ask_one", buggy)
    with capture_logs() as logs:
        result = await classify(requester, quorum=2, policy=ALL_AT_ONCE)
    crashed = [e for e in logs if e["event"] == "ask_crashed"]
    assert [(e["peer"], type(e["exc_info"])) for e in crashed] == [(broken.peer_id, RuntimeError)]
    assert result.label == 3
    assert result.missing == (broken.peer_id,)
    assert {r.variant for r in result.replies} == {"V2", "V3"}


def _ask(rig: Rig, requester: Requester, peer: FakePeer) -> asyncio.Future[Answer]:
    """One ask of ``peer`` outside any call, as a fan-out makes it."""
    record = rig.table.get(peer.peer_id)
    assert record is not None
    request = wire.build_request(rig.identity, swarm=SWARM, tensor=TENSOR, deadline_ms=5000)
    return requester.ask_peer(record, request, wire.encode_request(request))


async def test_a_lone_ask_cancelled_before_it_starts_leaves_its_peer_free(rig: Rig) -> None:
    """An ask cancelled at once (a call stopped in the step that asked) must not leave
    its peer's link busy: the next call's ask to that peer goes out, it does not wait
    for an exchange that never ran."""
    peer = await rig.peer("V1", says({3: 0.9}))
    requester = rig.requester()
    ask = _ask(rig, requester, peer)
    ask.cancel()  # before the task that would run the exchange took its first step
    with pytest.raises(asyncio.CancelledError):
        await ask
    result = await classify(requester)
    assert result.label == 3
    assert [r.variant for r in result.replies] == ["V1"]


async def test_a_reply_whose_ask_ended_is_left_unread(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that comes in after its ask ended (its call decided without it) is
    neither checked nor decoded: no one would read it. The next ask to that peer is."""
    peer = await rig.peer("V1", hangs({3: 0.9}))
    requester = rig.requester()
    ask = _ask(rig, requester, peer)
    async with asyncio.timeout(5):
        await peer.received.wait()  # the exchange is out
    ask.cancel()
    decoded: list[bytes] = []
    decode = wire.decode_reply

    def counted(raw: bytes) -> wire.InferReply:
        decoded.append(raw)
        return decode(raw)

    monkeypatch.setattr(wire, "decode_reply", counted)
    peer.release.set()
    result = await classify(requester)  # its ask goes once the exchange above has ended
    assert result.label == 3
    assert len(peer.bodies) == 2
    assert len(decoded) == 1  # the classify's reply alone


async def test_suspected_peer_is_probed_and_taken_back(rig: Rig) -> None:
    """A suspected peer that answers its health check becomes a candidate again."""
    lost = await rig.peer("V1", says({3: 0.8}))
    await rig.peer("V2", says({3: 0.8}))
    for _ in range(TIMINGS.suspect_after_failures):
        rig.table.report_failure(lost.peer_id, now=0.0)
    assert lost.peer_id not in {r.peer_id for r in rig.table.candidates()}
    recovered = asyncio.Event()
    rig.table.add_listener(lambda event, record: recovered.set() if event == "recovered" else None)
    requester = rig.requester(timings=dataclasses.replace(TIMINGS, probe_interval_s=0.05))
    first = await classify(requester)
    assert [r.variant for r in first.replies] == ["V2"]
    async with asyncio.timeout(5):
        await recovered.wait()
    assert lost.probed >= 1
    assert lost.peer_id in {r.peer_id for r in rig.table.candidates()}


# --- waves ---------------------------------------------------------------------------------


async def wave_peers(rig: Rig, says_by_variant: dict[str, Behaviour]) -> dict[str, FakePeer]:
    return {v: await rig.peer(v, b) for v, b in says_by_variant.items()}


async def test_wave_asks_only_the_first_slots_when_they_settle(rig7: Rig) -> None:
    """Three confident agreeing replies settle five ballots: the other two are never asked,
    and the label is the one asking everyone gives."""
    peers = await wave_peers(rig7, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
    requester = rig7.requester()
    result = await classify(requester, policy=Policy(wave=3))
    asked = {v for v, p in peers.items() if p.bodies}
    assert len(asked) == 3
    assert {r.variant for r in result.replies} == asked
    assert result.skipped == result.missing == ()
    everyone = await classify(requester, quorum=5)
    assert result.label == everyone.label == 3


async def test_wave_asks_the_reserve_when_the_first_wave_leaves_it_open(rig7: Rig) -> None:
    """A split first wave cannot settle: the reserve is asked and decides."""
    peers = await wave_peers(
        rig7,
        {
            "V1": says({3: 0.9}),
            "V2": says({7: 0.9}),
            "V3": says({3: 0.9}),
            "V4": says({3: 0.9}),
            "V5": says({3: 0.9}),
        },
    )
    result = await classify(rig7.requester(), policy=Policy(wave=3))
    assert all(p.bodies for p in peers.values())
    assert result.label == 3
    assert len(result.replies) == 5


async def test_wave_calls_the_reserve_when_a_first_wave_slot_runs_out(rig7: Rig) -> None:
    """A first-wave peer that fails while another hangs: the reserve is asked at once, and
    the call settles without waiting for the hung one."""
    peers = await wave_peers(
        rig7,
        {
            "V1": unavailable,
            "V2": hangs({3: 0.9}),
            "V3": says({3: 0.9}),
            "V4": says({3: 0.9}),
            "V5": says({3: 0.9}),
        },
    )
    async with asyncio.timeout(3):  # far below the 30 s deadline and hedge delay
        result = await rig7.requester().classify(TENSOR, policy=Policy(wave=3), deadline_ms=30_000)
    assert peers["V4"].bodies and peers["V5"].bodies
    assert result.label == 3
    assert result.missing == (peers["V1"].peer_id,)
    assert result.skipped == (peers["V2"].peer_id,)


async def test_wave_calls_the_reserve_at_the_hedge_delay(rig7: Rig) -> None:
    """A first-wave peer still silent at the hedge delay: the reserve is asked then."""
    peers = await wave_peers(
        rig7,
        {
            "V1": hangs({3: 0.9}),
            "V2": says({3: 0.9}),
            "V3": says({3: 0.9}),
            "V4": says({3: 0.9}),
            "V5": says({3: 0.9}),
        },
    )
    timings = dataclasses.replace(TIMINGS, hedge_after_s=0.05)
    async with asyncio.timeout(3):
        result = await rig7.requester(timings=timings).classify(
            TENSOR, policy=Policy(wave=3), deadline_ms=30_000
        )
    assert peers["V4"].bodies and peers["V5"].bodies
    assert result.label == 3
    assert result.skipped == (peers["V1"].peer_id,)


def priced_rig() -> Rig:
    """Five variants whose models cost differently (manifest latency), the cheaper ones
    mostly less accurate: (accuracy, latency ms)."""
    specs = {"V1": (0.93, 0.35), "V2": (0.9, 0.1), "V3": (0.91, 0.3), "V4": (0.92, 0.2)}
    specs["V5"] = (0.95, 0.5)
    return Rig(manifest_of(*(spec(v, acc=a, latency_ms=ms) for v, (a, ms) in specs.items())))


async def test_wave_asks_the_cheapest_models_first() -> None:
    """Which slots go first cannot change the label, so the first wave is the three
    models that cost least per unit of weight, not the three most accurate (V5, V1, V4);
    the two others are asked only when the label stays open."""
    rig = priced_rig()
    try:
        peers = await wave_peers(rig, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
        result = await classify(rig.requester(), policy=Policy(wave=3))
        assert {v for v, p in peers.items() if p.bodies} == {"V2", "V4", "V3"}
        assert {r.variant for r in result.replies} == {"V2", "V4", "V3"}
    finally:
        await rig.aclose()


async def test_wave_asks_a_cheap_peer_of_poor_reputation_last() -> None:
    """The rank is cost per unit of trust: the cheapest model's peer, once its answers
    disagreed often enough to weigh a quarter (or nothing), waits in the reserve."""
    rig = priced_rig()
    try:
        peers = await wave_peers(rig, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
        doubted = peers["V2"].peer_id
        for _ in range(50):
            if rig.reputation.weight(doubted) <= 0.25:
                break
            rig.reputation.record(doubted, agreed=False)
        assert rig.reputation.weight(doubted) <= 0.25
        await classify(rig.requester(), policy=Policy(wave=3))
        assert {v for v, p in peers.items() if p.bodies} == {"V4", "V3", "V1"}
    finally:
        await rig.aclose()


async def test_first_wave_key_gives_another_order() -> None:
    """The requester's ``first_wave_key`` picks the order (the benchmark puts the old
    one back with it): the three most accurate first."""
    rig = priced_rig()
    try:
        peers = await wave_peers(rig, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
        requester = rig.requester()
        requester.first_wave_key = lambda slot: (-slot.weight_bound, slot.spec.latency_ms)
        await classify(requester, policy=Policy(wave=3))
        assert {v for v, p in peers.items() if p.bodies} == {"V5", "V1", "V4"}
    finally:
        await rig.aclose()


def test_wave_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="wave"):
        Policy(wave=0)


@pytest.mark.parametrize("wave", ["most", "3", True, 2.5])
def test_wave_is_auto_a_count_or_none(wave: object) -> None:
    with pytest.raises(ConfigError, match=r"Policy\.wave must be 'auto', an integer >= 1 or None"):
        Policy(wave=wave)  # type: ignore[arg-type]


async def test_auto_wave_asks_everyone_at_once_until_the_requester_is_busy(
    rig7: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default wave: calls that start with fewer than WAVE_IN_FLIGHT calls in flight
    ask all five ballots at once; from there on a majority (three) first, and the two
    held back are asked by none of them, since three confident replies settle the label."""
    monkeypatch.setattr(config, "WAVE_IN_FLIGHT", 3)
    peers = await wave_peers(rig7, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
    async with asyncio.timeout(10):
        results = await concurrent_calls(rig7.requester(), 6, quorum=1)
    assert [r.wave for r in results] == [None, None, 3, 3, 3, 3]
    assert [len(r.replies) for r in results] == [5, 5, 3, 3, 3, 3]
    assert all(r.label == 3 and not r.missing and not r.rejected for r in results)
    asks = sorted(len(p.bodies) + sum(p.batches) for p in peers.values())
    assert asks == [2, 2, 6, 6, 6]  # the reserve, asked only by the first two calls
    alone = await classify(rig7.requester())
    assert (alone.wave, len(alone.replies)) == (None, 5)  # nothing else in flight


async def test_auto_wave_never_holds_back_ballots_a_quorum_needs(
    rig7: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "WAVE_IN_FLIGHT", 1)  # every call counts as under load
    await wave_peers(rig7, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
    requester = rig7.requester()
    assert (await classify(requester)).wave == 3
    assert (await classify(requester, quorum=4)).wave == 4
    assert (await classify(requester, quorum=5)).wave is None  # every ballot at once
    assert (await classify(requester, policy=ALL_AT_ONCE)).wave is None


# --- coalescing ----------------------------------------------------------------------------


async def concurrent_calls(requester: Requester, n: int, quorum: int = 3) -> list[ClassifyResult]:
    async with asyncio.timeout(10):
        return await asyncio.gather(*(requester.classify(TENSOR, quorum=quorum) for _ in range(n)))


async def test_concurrent_asks_to_a_busy_peer_go_as_batches(rig: Rig) -> None:
    """Twelve calls at once: each peer runs two exchanges and the asks waiting behind
    them go together as batches; every call is decided from three verified replies."""
    peers = [await rig.peer(v, slow(0.05, {3: 0.9})) for v in ("V1", "V2", "V3")]
    results = await concurrent_calls(rig.requester(), 12)
    assert [r.label for r in results] == [3] * 12
    assert all(len(r.replies) == 3 and not r.rejected for r in results)
    for peer in peers:
        assert peer.batches, "the asks queued behind busy exchanges went as one batch"
        assert len(peer.bodies) + sum(peer.batches) == 12  # one ask per call, none lost
        assert len(peer.bodies) + len(peer.batches) < 12  # fewer exchanges than calls


async def test_asks_for_a_busy_peer_wait_for_its_one_exchange(rig: Rig) -> None:
    """While one exchange with a peer is out, the next asks wait and go together when it
    ends: a larger batch for the peer's model rather than a second exchange."""
    peer = await rig.peer("V1", hangs({3: 0.9}))
    requester = rig.requester()
    calls = [asyncio.create_task(classify(requester)) for _ in range(3)]
    await asyncio.wait_for(peer.received.wait(), 5)
    peer.release.set()
    results = await asyncio.gather(*calls)
    assert [r.label for r in results] == [3, 3, 3]
    assert (len(peer.bodies), peer.batches) == (1, [2])


async def test_further_exchange_at_one_opens_a_second_exchange_for_any_ask(rig: Rig) -> None:
    """The rule before (``sim.bench``'s two-exchanges row): a second exchange as soon as
    an ask waits, so of three calls two go alone at once and the third after them."""
    peer = await rig.peer("V1", hangs({3: 0.9}))
    requester = rig.requester()
    requester.further_exchange_at = 1
    calls = [asyncio.create_task(classify(requester)) for _ in range(3)]
    await asyncio.wait_for(peer.received.wait(), 5)
    peer.release.set()
    assert [r.label for r in await asyncio.gather(*calls)] == [3, 3, 3]
    assert (len(peer.bodies), peer.batches) == (3, [])


async def test_a_full_batch_opens_a_second_exchange_while_one_is_out(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer so busy that a full batch waits for it gets that batch at once, on a second
    exchange, while the first is still out."""
    monkeypatch.setattr(config, "MAX_BATCH_ITEMS", 2)
    peer = await rig.peer("V1", hangs({3: 0.9}))
    requester = rig.requester()
    calls = [asyncio.create_task(classify(requester)) for _ in range(3)]
    await asyncio.wait_for(peer.batch_arrived.wait(), 5)
    assert not peer.release.is_set() and (len(peer.bodies), peer.batches) == (1, [2])
    peer.release.set()
    assert [r.label for r in await asyncio.gather(*calls)] == [3, 3, 3]


async def test_coalescing_off_sends_every_ask_alone(rig: Rig) -> None:
    peers = [await rig.peer(v, slow(0.05, {3: 0.9})) for v in ("V1", "V2", "V3")]
    results = await concurrent_calls(rig.requester(coalesce=False), 6)
    assert [r.label for r in results] == [3] * 6
    assert all(len(p.bodies) == 6 and not p.batches for p in peers)


async def test_a_reply_batch_with_a_bad_signature_is_rejected_item_by_item(rig: Rig) -> None:
    """A batch signed with a key the peer did not announce: every item of it is rejected
    as bad_signature and not counted; the calls decide from the other peers."""
    await rig.peer("V1", slow(0.1, {3: 0.9}))
    await rig.peer("V2", slow(0.1, {3: 0.9}))
    # Faster than the others, so its batch goes out before any call can exit early.
    forger = await rig.peer("V3", slow(0.02, {7: 1.0}))
    forger.batch_signer = Identity.generate()
    requester = rig.requester()
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(requester.classify(TENSOR) for _ in range(12)))
    assert forger.batches
    assert all(r.label == 3 for r in results)
    rejected = [x for r in results for x in r.rejected]
    assert sum(forger.batches) == len(rejected)
    assert {(x.peer, x.reason) for x in rejected} == {(forger.peer_id, "bad_signature")}
    assert rejections(rig, "bad_signature") == len(rejected)


async def test_batches_in_a_session_go_by_mac_and_dissenting_items_are_checked(
    rig: Rig,
) -> None:
    """In a session the requester's batches carry no signature (the MAC stands for
    it), and a reply batch's signature is checked only for a dissenting item: a forger
    that agrees counts, one that dissents is caught."""
    await rig.peer("V1", slow(0.1, {3: 0.9}), sessions=True)
    await rig.peer("V2", slow(0.1, {3: 0.9}), sessions=True)
    forger = await rig.peer("V3", slow(0.02, {7: 1.0}), sessions=True)
    forger.batch_signer = Identity.generate()
    requester = rig.requester()
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(requester.classify(TENSOR) for _ in range(12)))
    assert forger.batches
    assert set(forger.batch_signatures) == {bytes(64)}
    assert all(r.label == 3 for r in results)
    rejected = [x for r in results for x in r.rejected]
    assert sum(forger.batches) == len(rejected)
    assert {(x.peer, x.reason) for x in rejected} == {(forger.peer_id, "bad_signature")}
    assert rig.reputation.score(forger.peer_id) < PRIOR_SCORE  # sent over its session


async def test_late_checks_draw_once_per_reply_batch_and_check_it_whole(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply batch's one signature covers all its replies, so the sample after the
    answer draws once per batch: a batch drawn has every reply checked, one not drawn
    none, and the share checked is the rate drawn at, not one draw per reply."""
    draws = itertools.cycle([0.0, 0.99])  # in the sample, out of it, in, ...
    drawn: list[int] = []

    class Alternating:
        def random(self) -> float:
            drawn.append(1)
            return next(draws)

    monkeypatch.setattr(requester_module, "_SAMPLER", Alternating())
    monkeypatch.setattr(config, "LATE_SIGNATURE_SAMPLE", 0.5)

    async def forged(peer: FakePeer, req: wire.InferRequest) -> web.Response:
        await asyncio.sleep(0.02)
        return respond(dataclasses.replace(reply_for(peer, req, {3: 0.9}), signature=bytes(64)))

    await rig.peer("V1", slow(0.1, {3: 0.9}))  # outside a session: checked on arrival
    await rig.peer("V2", slow(0.1, {3: 0.9}))
    # Agrees, so its replies count on their session MAC; every signature of it is bad.
    forger = await rig.peer("V3", forged, sessions=True)
    forger.batch_signer = Identity.generate()
    requester = rig.requester()
    with capture_logs() as logs:
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                *(requester.classify(TENSOR, policy=ALL_AT_ONCE) for _ in range(12))
            )
        await asyncio.sleep(0)  # the checks run on the next turn of the loop
    assert all(r.label == 3 and forger.peer_id in {b.peer for b in r.replies} for r in results)
    assert [n for n in forger.batches if n > 1], "the forger's asks went as batches"
    found = {e["request"] for e in logs if e["event"] == "late_bad_signature"}
    assert found, "the first draw samples, and the forger's every reply fails"
    for ids in forger.batch_ids:
        assert set(ids) <= found or not found & set(ids), "a batch is checked whole or not"
    # One draw per single reply and per batch, not per reply.
    assert len(drawn) == len(forger.bodies) + len(forger.batches) < 12


async def test_a_refused_batch_item_fails_only_that_ask(rig: Rig) -> None:
    """A peer that refuses one item of a batch: that call misses its reply; the others
    in the batch are answered and counted."""

    async def refuse_first(peer: FakePeer, batch: wire.InferBatch) -> wire.ReplyBatch:
        first, *rest = batch.items
        items: list[wire.InferReply | wire.ItemError] = [
            wire.ItemError(first.request_id, "stale", "issued too long ago")
        ]
        items += [reply_for(peer, req, {3: 0.9}, sign=False) for req in rest]
        return wire.sign_replies(peer.identity, items)

    await rig.peer("V1", slow(0.1, {3: 0.9}))
    await rig.peer("V2", slow(0.1, {3: 0.9}))
    odd = await rig.peer("V3", slow(0.01, {3: 0.9}))  # its batch goes before any early exit
    odd.batch_behaviour = refuse_first
    requester = rig.requester()
    async with asyncio.timeout(10):
        results = await asyncio.gather(
            *(requester.classify(TENSOR, policy=ALL_AT_ONCE) for _ in range(12))
        )
    assert len(odd.batches) == 1
    missing = [r for r in results if odd.peer_id in r.missing]
    assert len(missing) == 1
    answered = [r for r in results if odd.peer_id in {x.peer for x in r.replies}]
    assert len(answered) == 11
    assert all(r.label == 3 for r in results)
