"""Tests of swarm.http.api: every route in-process through aiohttp's test client.

The app runs the real ONNX engine (a tiny model) and real signing and verification; the
requester behind /v1/classify is a recording fake, since what is pinned here is the HTTP
contract (status codes, JSON errors, parameter checks), not the fan-out.

Every test that takes the harness runs twice: served by aiohttp alone, and by the peer's
lean front (``swarm.http.front``, as ``python -m swarm.peer`` serves), which answers the
peer-to-peer POSTs itself and hands every other request to aiohttp. The contract is the
same either way.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from structlog.testing import capture_logs
from yarl import URL

from swarm import PROTOCOL_VERSION, config
from swarm.config import Timings
from swarm.crypto.identity import Identity, TrustStore, verify_signature
from swarm.crypto.session import (
    MAC_HEADER,
    SESSION_HEADER,
    SESSION_PATH,
    UNKNOWN_SESSION,
    Offer,
    SessionKeys,
)
from swarm.discovery.mdns import Announcement, PeerTable
from swarm.errors import ConfigError, InferenceError, NoDecisionError
from swarm.http.api import ServerContext, create_app
from swarm.http.listener import HttpServer
from swarm.inference.engine import Engine, FloatArray, InferenceResult, Manifest, ModelSpec
from swarm.metrics import Metrics
from swarm.requester.requester import Policy
from swarm.wire import codec as wire

SWARM = "test-swarm"
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@dataclasses.dataclass
class FakeOutcome:
    label: int

    def to_json(self, image: str | None = None) -> dict[str, Any]:
        return {"image": image, "label": self.label, "class": "Trouser"}


class FakeClassifier:
    """Records each call; answers label 1, or raises what it is told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[FloatArray, dict[str, Any]]] = []
        self.raises: Exception | None = None

    async def classify(self, tensor: FloatArray, **kwargs: Any) -> FakeOutcome:
        self.calls.append((tensor, kwargs))
        if self.raises is not None:
            raise self.raises
        return FakeOutcome(label=1)


class GatedModel:
    """A model that holds every call until released (or fails, if told to)."""

    def __init__(self, spec: ModelSpec, *, fail: bool = False) -> None:
        self.spec = spec
        self.fail = fail
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def infer(self, x: FloatArray) -> InferenceResult:
        self.started.set()
        if self.fail:
            raise InferenceError("model crashed on this input")
        await self.release.wait()
        probs = np.full(config.NUM_CLASSES, 0.1, dtype=np.float32)
        return InferenceResult(probs, 0.001, 1)


@dataclasses.dataclass
class Harness:
    client: TestClient[web.Request, web.Application]
    server_identity: Identity
    requester: Identity
    classifier: FakeClassifier
    metrics: Metrics
    table: PeerTable

    def request_body(self, **kw: Any) -> bytes:
        kw.setdefault("swarm", SWARM)
        kw.setdefault("tensor", sample_tensor())
        kw.setdefault("deadline_ms", 2000)
        return wire.encode_request(wire.build_request(self.requester, **kw))


Factory = Callable[..., Awaitable[Harness]]


def sample_tensor(seed: int = 0) -> FloatArray:
    return np.random.default_rng(seed).random(config.INPUT_SHAPE, dtype=np.float32)


def npy_bytes(array: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def png_bytes(pixels: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
async def engine(tiny_manifest: Manifest) -> AsyncIterator[Engine]:
    """The tiny T1 variant, running."""
    async with Engine(tiny_manifest.get("T1")) as eng:
        yield eng


class LeanTestServer(TestServer):
    """A test server that serves the app as a peer does: ``HttpServer`` with the lean
    front. aiohttp's test client talks to it like to any server."""

    def __init__(self, app: web.Application, *, timings: Timings) -> None:
        super().__init__(app, host="127.0.0.1")
        self.timings = timings

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.runner is not None:
            return
        self.http = HttpServer(self.app, hosts=[self.host], port=0, timings=self.timings)
        await self.http.start()
        self.runner = self.http.runner
        self.port = self.http.port
        self._root = URL(f"http://{self.host}:{self.port}")

    async def close(self) -> None:
        if self.runner is not None and not self.closed:
            await self.http.aclose()
            self._closed = True


@pytest.fixture(params=["aiohttp", "lean"])
async def make_app(
    request: pytest.FixtureRequest, tiny_manifest: Manifest, engine: Engine
) -> AsyncIterator[Factory]:
    """Builds an app and a test client around it (served by aiohttp alone, or by the lean
    front); closes every client at teardown."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(
        *,
        model: Any = None,
        trust: TrustStore | None = None,
        classifier: Any = ...,
        **ctx_kw: Any,
    ) -> Harness:
        server_identity = Identity.generate()
        metrics = Metrics()
        table = PeerTable(SWARM)
        fake = FakeClassifier()
        ctx = ServerContext(
            identity=server_identity,
            swarm=SWARM,
            trust=trust if trust is not None else TrustStore.open(),
            model=model if model is not None else engine,
            manifest=tiny_manifest,
            table=table,
            metrics=metrics,
            classifier=fake if classifier is ... else classifier,
            **ctx_kw,
        )
        server: TestServer
        if request.param == "lean":
            server = LeanTestServer(create_app(ctx), timings=ctx.timings)
        else:
            server = TestServer(create_app(ctx), host="127.0.0.1")
        client: TestClient[web.Request, web.Application] = TestClient(server)
        await client.start_server()
        clients.append(client)
        return Harness(client, server_identity, Identity.generate(), fake, metrics, table)

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def harness(make_app: Factory) -> Harness:
    """An app with an open trust store, the real tiny engine and a fake classifier."""
    return await make_app()


async def assert_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    return dict(body)


# --- status routes ---------------------------------------------------------------------


async def test_healthz(harness: Harness) -> None:
    """GET /healthz answers ok with the peer id and variant."""
    resp = await harness.client.get("/healthz")
    assert resp.status == 200
    body = await resp.json()
    assert body == {"status": "ok", "peer_id": harness.server_identity.peer_id, "variant": "T1"}


async def test_info_describes_peer_and_the_peers_it_sees(
    harness: Harness, tiny_manifest: Manifest
) -> None:
    """GET /v1/info has identity, model, protocol, swarm and the other peers, not itself."""
    other = Identity.generate()
    for ident, variant in ((other, "T2"), (harness.server_identity, "T1")):
        ann = Announcement(
            swarm=SWARM,
            peer_id=ident.peer_id,
            public_key=ident.public_key,
            role="peer",
            port=9000,
            variant=variant,
            model_sha256="cd" * 32,
            macs=1,
            accuracy=0.8,
        )
        txt = {k.encode(): v.encode() for k, v in ann.txt().items()}
        assert harness.table.offer(
            f"{ident.peer_id}.{config.SERVICE_TYPE}", txt, ["127.0.0.1"], 9000
        )
    resp = await harness.client.get("/v1/info")
    assert resp.status == 200
    info = await resp.json()
    spec = tiny_manifest.get("T1")
    assert info["peer_id"] == harness.server_identity.peer_id
    assert info["public_key"] == harness.server_identity.public_key_b64
    assert (info["variant"], info["model_sha256"]) == ("T1", spec.sha256)
    assert (info["protocol"], info["swarm"]) == (PROTOCOL_VERSION, SWARM)
    assert [(p["peer_id"], p["variant"]) for p in info["peers"]] == [(other.peer_id, "T2")]
    assert info["peers"][0]["addresses"] == ["127.0.0.1"]


async def test_metrics_counts_requests_and_rejections(harness: Harness) -> None:
    """GET /metrics is Prometheus text with request, rejection and peer-table series."""
    await harness.client.get("/healthz")
    await harness.client.post("/v1/infer", data=b"{}")
    resp = await harness.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'vswarm_requests_total{endpoint="/healthz",status="200"} 1.0' in text
    assert 'vswarm_requests_total{endpoint="/v1/infer",status="400"} 1.0' in text
    assert 'vswarm_rejections_total{reason="malformed"} 1.0' in text
    assert 'vswarm_peers{state="total"} 0.0' in text


async def test_unknown_path_and_wrong_method_are_json(harness: Harness) -> None:
    """An unknown path is a JSON 404; a wrong method a JSON 405 naming the allowed one."""
    await assert_error(await harness.client.get("/nope"), 404, "not_found")
    body = await assert_error(await harness.client.get("/v1/infer"), 405, "method_not_allowed")
    assert "POST" in body["message"]
    resp = await harness.client.put("/healthz")
    assert resp.headers["Allow"].startswith("GET")
    await assert_error(resp, 405, "method_not_allowed")


# --- /v1/infer -------------------------------------------------------------------------


async def test_infer_answers_a_signed_reply_bound_to_the_request(
    harness: Harness, engine: Engine, tiny_manifest: Manifest
) -> None:
    """A valid request gets a top-k reply that verifies against the peer's key."""
    tensor = sample_tensor(3)
    req = wire.build_request(harness.requester, swarm=SWARM, tensor=tensor, k=3, deadline_ms=2000)
    resp = await harness.client.post("/v1/infer", data=wire.encode_request(req))
    assert resp.status == 200, await resp.text()
    reply = wire.decode_reply(await resp.read())
    wire.verify_reply(
        reply,
        request=req,
        expected_peer_id=harness.server_identity.peer_id,
        expected_key=harness.server_identity.public_key,
        trust=TrustStore.open(),
        now_ms=wire.unix_ms(),
        freshness_s=30.0,
        expected_variant="T1",
        expected_model_sha256=tiny_manifest.get("T1").sha256,
    )
    expected = (await engine.infer(tensor)).probs
    assert [c for c, _ in reply.topk] == list(np.argsort(-expected, kind="stable")[:3])


async def test_infer_batch_answers_each_item_under_one_signature(
    harness: Harness, engine: Engine, tiny_manifest: Manifest
) -> None:
    """A batch of three gets three replies, each bound to its request, in order, under
    one signature of the peer; an item already served is refused alone."""
    tensors = [sample_tensor(i) for i in range(3)]
    reqs = [
        wire.build_request(harness.requester, swarm=SWARM, tensor=t, deadline_ms=2000)
        for t in tensors
    ]
    served = await harness.client.post("/v1/infer", data=wire.encode_request(reqs[1]))
    assert served.status == 200
    batch = wire.build_batch(harness.requester, reqs)
    resp = await harness.client.post("/v1/infer/batch", data=wire.encode_batch(batch))
    assert resp.status == 200, await resp.text()
    replies = wire.decode_reply_batch(await resp.read())
    server = harness.server_identity
    assert replies.responder_id == server.peer_id
    assert verify_signature(server.public_key, replies.signature, replies.signed_bytes())
    first, second, third = replies.items
    assert isinstance(second, wire.ItemError)
    assert (second.request_id, second.error) == (reqs[1].request_id, "replayed")
    for reply, req, tensor in ((first, reqs[0], tensors[0]), (third, reqs[2], tensors[2])):
        assert isinstance(reply, wire.InferReply)
        wire.verify_reply(
            reply,
            request=req,
            expected_peer_id=server.peer_id,
            expected_key=server.public_key,
            trust=TrustStore.open(),
            now_ms=wire.unix_ms(),
            freshness_s=30.0,
            expected_variant="T1",
            expected_model_sha256=tiny_manifest.get("T1").sha256,
            signature_verified=True,
        )
        expected = (await engine.infer(tensor)).probs
        assert reply.topk[0][0] == int(np.argmax(expected))
    # The items are unsigned: only the batch signature makes them evidence.
    assert first.signature == b""


async def test_infer_batch_bad_signature_is_401_and_serves_nothing(harness: Harness) -> None:
    """A batch whose signature does not cover its items is refused whole."""
    reqs = [
        wire.build_request(
            harness.requester, swarm=SWARM, tensor=sample_tensor(i), deadline_ms=2000
        )
        for i in range(2)
    ]
    batch = wire.build_batch(harness.requester, reqs)
    forged = dataclasses.replace(batch, items=(batch.items[0], batch.items[0]))
    resp = await harness.client.post("/v1/infer/batch", data=wire.encode_batch(forged))
    await assert_error(resp, 401, "bad_signature")
    # Nothing was remembered as served: the genuine batch still goes through.
    resp = await harness.client.post("/v1/infer/batch", data=wire.encode_batch(batch))
    assert resp.status == 200
    assert all(
        isinstance(i, wire.InferReply) for i in wire.decode_reply_batch(await resp.read()).items
    )


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'{"version": 1}',
        b'{"version": 1, "requester_key": "", "items": [], "signature": ""}',
        b'{"version": "1", "requester_key": "", "items": [], "signature": ""}',
    ],
)
async def test_infer_batch_malformed_is_400(harness: Harness, body: bytes) -> None:
    await assert_error(
        await harness.client.post("/v1/infer/batch", data=body), 400, "malformed_request"
    )


async def test_infer_batch_of_another_requesters_item_is_400(harness: Harness) -> None:
    """Every item of a batch must be the signer's own request."""
    mine = wire.build_request(
        harness.requester, swarm=SWARM, tensor=sample_tensor(), deadline_ms=2000
    )
    theirs = wire.build_request(
        Identity.generate(), swarm=SWARM, tensor=sample_tensor(), deadline_ms=2000
    )
    batch = wire.build_batch(harness.requester, [mine])
    mixed = dataclasses.replace(batch, items=(batch.items[0], theirs))
    body = await assert_error(
        await harness.client.post("/v1/infer/batch", data=wire.encode_batch(mixed)),
        400,
        "malformed_request",
    )
    assert "signer" in body["message"]


async def test_infer_bad_signature_is_401(harness: Harness) -> None:
    """A request whose signature does not verify is refused with 401 bad_signature."""
    obj = json.loads(harness.request_body())
    sig = bytearray(base64.b64decode(obj["signature"]))
    sig[0] ^= 1
    obj["signature"] = base64.b64encode(bytes(sig)).decode()
    resp = await harness.client.post("/v1/infer", data=json.dumps(obj))
    await assert_error(resp, 401, "bad_signature")


async def test_infer_untrusted_key_is_403(make_app: Factory) -> None:
    """With an allow-list, a requester not on it gets 403 untrusted_key."""
    h = await make_app(trust=TrustStore.from_keys([Identity.generate().public_key]))
    await assert_error(
        await h.client.post("/v1/infer", data=h.request_body()), 403, "untrusted_key"
    )


async def test_infer_trusted_key_passes_allow_list(make_app: Factory) -> None:
    """A requester on the allow-list is served."""
    h = await make_app()
    h2 = await make_app(trust=TrustStore.from_keys([h.requester.public_key]))
    h2.requester = h.requester
    assert (await h2.client.post("/v1/infer", data=h2.request_body())).status == 200


async def test_infer_replay_is_409(harness: Harness) -> None:
    """The same signed request sent twice is served once, then refused with 409; the
    refusal is logged with the request's ids."""
    body = harness.request_body()
    assert (await harness.client.post("/v1/infer", data=body)).status == 200
    with capture_logs() as logs:
        await assert_error(await harness.client.post("/v1/infer", data=body), 409, "replayed")
    [event] = [e for e in logs if e["event"] == "infer_rejected"]
    assert event["reason"] == "replayed"
    assert event["request_id"] == json.loads(body)["request_id"]
    assert event["requester"] == harness.requester.peer_id


# --- sessions ----------------------------------------------------------------------------


async def open_session(h: Harness, requester: Identity | None = None) -> SessionKeys:
    offer = Offer(requester or h.requester, SWARM)
    resp = await h.client.post(SESSION_PATH, data=wire.encode_hello(offer.hello))
    assert resp.status == 200, await resp.text()
    return offer.accept(
        wire.decode_welcome(await resp.read()),
        expected_peer_id=h.server_identity.peer_id,
        expected_key=h.server_identity.public_key,
        now_ms=wire.unix_ms(),
        freshness_s=30.0,
    )


def sealed(keys: SessionKeys, path: str, body: bytes) -> tuple[dict[str, str], bytes]:
    mac = keys.request_mac(path, body)
    headers = {SESSION_HEADER: keys.session_id, MAC_HEADER: base64.b64encode(mac).decode()}
    return headers, mac


async def assert_sealed(resp: Any, keys: SessionKeys, request_mac: bytes) -> bytes:
    body = bytes(await resp.read())
    mac = base64.b64decode(resp.headers[MAC_HEADER])
    assert mac == keys.reply_mac(request_mac, resp.status, body)
    return body


def unsigned_body(h: Harness, **kw: Any) -> bytes:
    """A request whose signature is garbage: only a session MAC can vouch for it."""
    obj = json.loads(h.request_body(**kw))
    obj["signature"] = base64.b64encode(bytes(64)).decode()
    return json.dumps(obj).encode()


async def test_session_request_is_served_by_its_mac_and_the_reply_is_sealed(
    harness: Harness,
) -> None:
    """In a session the MAC stands for the request's signature; the reply is still
    signed by the peer, and MACed for this request."""
    keys = await open_session(harness)
    body = unsigned_body(harness)
    headers, mac = sealed(keys, "/v1/infer", body)
    resp = await harness.client.post("/v1/infer", data=body, headers=headers)
    assert resp.status == 200, await resp.text()
    reply = wire.decode_reply(await assert_sealed(resp, keys, mac))
    server = harness.server_identity
    assert verify_signature(server.public_key, reply.signature, reply.signed_bytes())
    # Without a session the same body is refused: its signature is garbage.
    fresh = unsigned_body(harness)
    await assert_error(await harness.client.post("/v1/infer", data=fresh), 401, "bad_signature")


async def test_session_errors_after_the_mac_are_sealed_too(harness: Harness) -> None:
    """A replay in a session is refused with 409, and the refusal carries the MAC."""
    keys = await open_session(harness)
    body = unsigned_body(harness)
    headers, mac = sealed(keys, "/v1/infer", body)
    assert (await harness.client.post("/v1/infer", data=body, headers=headers)).status == 200
    resp = await harness.client.post("/v1/infer", data=body, headers=headers)
    await assert_sealed(resp, keys, mac)
    await assert_error(resp, 409, "replayed")


async def test_session_wrong_mac_is_401_and_serves_nothing(harness: Harness) -> None:
    keys = await open_session(harness)
    body = unsigned_body(harness)
    headers, _ = sealed(keys, "/v1/infer/batch", body)  # the MAC of another path
    for bad in (headers, {**headers, MAC_HEADER: "not base64!"}, {SESSION_HEADER: keys.session_id}):
        resp = await harness.client.post("/v1/infer", data=body, headers=bad)
        await assert_error(resp, 401, "bad_signature")
    headers, _ = sealed(keys, "/v1/infer", body)
    assert (await harness.client.post("/v1/infer", data=body, headers=headers)).status == 200


async def test_unknown_session_is_401_unknown_session(harness: Harness) -> None:
    body = harness.request_body()
    resp = await harness.client.post(
        "/v1/infer", data=body, headers={SESSION_HEADER: "0" * 32, MAC_HEADER: ""}
    )
    message = (await assert_error(resp, 401, UNKNOWN_SESSION))["message"]
    assert SESSION_PATH in message


async def test_session_of_another_requester_is_401(harness: Harness) -> None:
    """A session vouches for its own requester's requests only."""
    keys = await open_session(harness, Identity.generate())
    body = harness.request_body()  # harness.requester's, not the session owner's
    headers, _ = sealed(keys, "/v1/infer", body)
    resp = await harness.client.post("/v1/infer", data=body, headers=headers)
    await assert_error(resp, 401, "wrong_key")


async def test_session_batch_is_served_by_its_mac(harness: Harness) -> None:
    keys = await open_session(harness)
    reqs = [
        wire.build_request(
            harness.requester, swarm=SWARM, tensor=sample_tensor(i), deadline_ms=2000
        )
        for i in range(2)
    ]
    batch = wire.build_batch(harness.requester, reqs)
    body = wire.encode_batch(dataclasses.replace(batch, signature=bytes(64)))
    headers, mac = sealed(keys, "/v1/infer/batch", body)
    resp = await harness.client.post("/v1/infer/batch", data=body, headers=headers)
    assert resp.status == 200, await resp.text()
    replies = wire.decode_reply_batch(await assert_sealed(resp, keys, mac))
    assert all(isinstance(i, wire.InferReply) for i in replies.items)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{}", 400, "malformed_request"),
        (b"x" * (config.MAX_SESSION_BODY + 1), 413, "body_too_large"),
    ],
)
async def test_session_malformed_hello_is_refused(
    harness: Harness, body: bytes, status: int, code: str
) -> None:
    await assert_error(await harness.client.post(SESSION_PATH, data=body), status, code)


async def test_session_hello_of_an_untrusted_key_is_403(make_app: Factory) -> None:
    h = await make_app(trust=TrustStore.from_keys([Identity.generate().public_key]))
    offer = Offer(h.requester, SWARM)
    resp = await h.client.post(SESSION_PATH, data=wire.encode_hello(offer.hello))
    await assert_error(resp, 403, "untrusted_key")


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"swarm": "another-swarm"}, "wrong_swarm"),
        ({"now_ms": 1_000_000}, "stale"),
    ],
)
async def test_infer_other_verification_failures_are_400(
    harness: Harness, kw: dict[str, Any], code: str
) -> None:
    """A well-signed request for another swarm, or a stale one, is a 400 naming why."""
    await assert_error(
        await harness.client.post("/v1/infer", data=harness.request_body(**kw)), 400, code
    )


def _mutations() -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    def set_(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
        return lambda obj: obj.__setitem__(key, value)

    return [
        ("shape 28x28", set_("input_shape", [28, 28])),
        ("shape 3x28x28", set_("input_shape", [3, 28, 28])),
        ("float64 input", set_("input", base64.b64encode(np.zeros(784, "<f8").tobytes()).decode())),
        (
            "uint8 input",
            set_("input", base64.b64encode(np.zeros(784, np.uint8).tobytes()).decode()),
        ),
        (
            "nan input",
            set_("input", base64.b64encode(np.full(784, np.nan, "<f4").tobytes()).decode()),
        ),
        ("missing field", lambda obj: obj.pop("k")),
        ("extra field", set_("variant", "T1")),
        ("float k", set_("k", 2.0)),
        ("k too big", set_("k", 11)),
        ("bad key", set_("requester_key", "xx")),
        ("other version", set_("version", PROTOCOL_VERSION + 1)),
    ]


@pytest.mark.parametrize(("what", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
async def test_infer_malformed_request_is_400(
    harness: Harness, what: str, mutate: Callable[[dict[str, Any]], Any]
) -> None:
    """A request with a wrong shape, dtype, field or type is a 400 malformed_request."""
    obj = json.loads(harness.request_body())
    mutate(obj)
    resp = await harness.client.post("/v1/infer", data=json.dumps(obj))
    await assert_error(resp, 400, "malformed_request")


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[]", b'{"a": 1.5}', b"\xff\xfe", b'{"version": 1}']
)
async def test_infer_garbage_is_400(harness: Harness, body: bytes) -> None:
    """Bodies that are not a request object at all are a 400, with what is wrong."""
    await assert_error(await harness.client.post("/v1/infer", data=body), 400, "malformed_request")


async def test_infer_oversize_is_413_declared_or_streamed(harness: Harness) -> None:
    """A body over MAX_INFER_BODY is a 413, whether Content-Length says so or not."""
    big = b"{" + b" " * config.MAX_INFER_BODY + b"}"
    await assert_error(await harness.client.post("/v1/infer", data=big), 413, "body_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(config.MAX_INFER_BODY // 4096 + 2):
            yield b" " * 4096

    resp = await harness.client.post("/v1/infer", data=chunks())
    await assert_error(resp, 413, "body_too_large")


async def test_infer_overload_is_503_with_retry_after(
    make_app: Factory, tiny_manifest: Manifest
) -> None:
    """Past the in-flight limit, /v1/infer answers 503 with Retry-After at once."""
    model = GatedModel(tiny_manifest.get("T1"))
    h = await make_app(model=model, max_infer_in_flight=1)
    first = asyncio.create_task(h.client.post("/v1/infer", data=h.request_body()))
    try:
        await model.started.wait()
        resp = await h.client.post("/v1/infer", data=h.request_body())
        await assert_error(resp, 503, "overloaded")
        assert resp.headers["Retry-After"] == str(config.RETRY_AFTER_S)
    finally:
        model.release.set()
        assert (await first).status == 200


async def test_infer_past_deadline_is_504(make_app: Factory, tiny_manifest: Manifest) -> None:
    """A model that does not answer within the request's deadline gives 504."""
    h = await make_app(model=GatedModel(tiny_manifest.get("T1")))
    resp = await h.client.post("/v1/infer", data=h.request_body(deadline_ms=20))
    await assert_error(resp, 504, "deadline_exceeded")


async def test_infer_model_failure_is_503(make_app: Factory, tiny_manifest: Manifest) -> None:
    """An inference error is a 503 inference_failed, and the peer keeps serving."""
    h = await make_app(model=GatedModel(tiny_manifest.get("T1"), fail=True))
    await assert_error(
        await h.client.post("/v1/infer", data=h.request_body()), 503, "inference_failed"
    )
    assert (await h.client.get("/healthz")).status == 200


async def test_slow_body_is_408(make_app: Factory) -> None:
    """A client that stops sending its body gets 408 after body_read_timeout_s."""
    h = await make_app(timings=Timings(body_read_timeout_s=0.05))
    stall = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"{"
        await stall.wait()

    try:
        await assert_error(await h.client.post("/v1/infer", data=chunks()), 408, "body_timeout")
    finally:
        stall.set()


# --- /v1/classify ----------------------------------------------------------------------


async def test_classify_npy_uses_defaults(harness: Harness) -> None:
    """An .npy image is decoded and classified with the default rule, k and policy."""
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    resp = await harness.client.post("/v1/classify", data=npy_bytes(pixels))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["label"] == 1
    [(tensor, kwargs)] = harness.classifier.calls
    np.testing.assert_allclose(tensor[0], pixels / 255.0, atol=1e-6)
    assert kwargs == {
        "rule": "robust",
        "k": config.DEFAULT_TOP_K,
        "quorum": 1,
        "deadline_ms": None,
        "policy": Policy(variants=None),
    }


async def test_classify_png_with_every_parameter(harness: Harness) -> None:
    """A PNG with rule, k, variants, replicas, wave, deadline_ms and quorum passes each
    one through."""
    pixels = np.arange(784, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
    resp = await harness.client.post(
        "/v1/classify",
        params={
            "rule": "sum",
            "k": "3",
            "variants": "T2,T1,T2",
            "replicas": "all",
            "wave": "2",
            "deadline_ms": "500",
            "quorum": "2",
        },
        data=png_bytes(pixels),
        headers={"Content-Type": "image/png"},
    )
    assert resp.status == 200, await resp.text()
    [(tensor, kwargs)] = harness.classifier.calls
    np.testing.assert_allclose(tensor[0], pixels / 255.0, atol=1e-6)
    assert kwargs == {
        "rule": "sum",
        "k": 3,
        "quorum": 2,
        "deadline_ms": 500,
        "policy": Policy(variants=("T2", "T1"), replicas=None, wave=2),
    }


@pytest.mark.parametrize(("text", "wave"), [("auto", "auto"), ("all", None), ("3", 3)])
async def test_classify_wave_parameter(harness: Harness, text: str, wave: object) -> None:
    pixels = np.zeros((28, 28), dtype=np.uint8)
    resp = await harness.client.post("/v1/classify", params={"wave": text}, data=npy_bytes(pixels))
    assert resp.status == 200, await resp.text()
    [(_, kwargs)] = harness.classifier.calls
    assert kwargs["policy"].wave == wave


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"rule": "bogus"}, "bad_parameter"),
        ({"k": "0"}, "bad_parameter"),
        ({"k": "11"}, "bad_parameter"),
        ({"k": "two"}, "bad_parameter"),
        ({"k": "+2"}, "bad_parameter"),
        ({"k": "²"}, "bad_parameter"),
        ({"deadline_ms": "0"}, "bad_parameter"),
        ({"deadline_ms": str(wire.MAX_DEADLINE_MS + 1)}, "bad_parameter"),
        ({"deadline_ms": "-5"}, "bad_parameter"),
        ({"quorum": "0"}, "bad_parameter"),
        ({"replicas": "0"}, "bad_parameter"),
        ({"wave": "some"}, "bad_parameter"),
        ({"wave": "0"}, "bad_parameter"),
        ({"colour": "red"}, "bad_parameter"),
        ({"variants": "T1,NOPE"}, "unknown_variant"),
        ({"variants": ""}, "unknown_variant"),
        ({"variants": "reference"}, "unknown_variant"),
    ],
)
async def test_classify_bad_parameters_are_400(
    harness: Harness, params: dict[str, str], code: str
) -> None:
    """Every bad query parameter is a 400 naming it, and the requester is never called."""
    body = npy_bytes(np.zeros((28, 28), np.uint8))
    resp = await harness.client.post("/v1/classify", params=params, data=body)
    await assert_error(resp, 400, code)
    assert harness.classifier.calls == []


async def test_classify_repeated_parameter_is_400(harness: Harness) -> None:
    """A parameter given twice is ambiguous and refused."""
    resp = await harness.client.post(
        "/v1/classify?k=1&k=2", data=npy_bytes(np.zeros((28, 28), np.uint8))
    )
    body = await assert_error(resp, 400, "bad_parameter")
    assert "more than once" in body["message"]


async def test_unknown_variant_error_lists_the_known_ones(harness: Harness) -> None:
    """The unknown_variant message names the variants this swarm has."""
    resp = await harness.client.post(
        "/v1/classify", params={"variants": "V9"}, data=npy_bytes(np.zeros((28, 28), np.uint8))
    )
    body = await assert_error(resp, 400, "unknown_variant")
    assert "T1, T2, T3" in body["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"GIF89a....",
        b"\x89PNG\r\n\x1a\nbroken",
        b"\xff\xd8\xffbroken",
        npy_bytes(np.zeros((3, 28, 28), np.uint8)),
        npy_bytes(np.zeros((28, 28), np.int64)),
        npy_bytes(np.full((28, 28), 2.0, np.float32)),
        npy_bytes(np.full((28, 28), np.nan)),
    ],
    ids=["empty", "gif", "bad-png", "bad-jpeg", "3x28x28", "int64", "over-one", "nan"],
)
async def test_classify_malformed_image_is_400(harness: Harness, body: bytes) -> None:
    """An image that is not a 28x28 PNG/JPEG/.npy of the right dtype is a 400."""
    await assert_error(await harness.client.post("/v1/classify", data=body), 400, "malformed_image")


async def test_classify_oversize_is_413(harness: Harness) -> None:
    """A body over MAX_CLASSIFY_BODY is a 413 before it is read."""
    resp = await harness.client.post(
        "/v1/classify", data=io.BytesIO(b"\0" * (config.MAX_CLASSIFY_BODY + 1))
    )
    await assert_error(resp, 413, "body_too_large")


async def test_classify_no_decision_is_503(harness: Harness) -> None:
    """A NoDecisionError from the requester is a 503 no_decision with its message."""
    harness.classifier.raises = NoDecisionError("no peers answered; quorum 1 not met")
    resp = await harness.client.post("/v1/classify", data=npy_bytes(np.zeros((28, 28), np.uint8)))
    body = await assert_error(resp, 503, "no_decision")
    assert "quorum" in body["message"]


async def test_classify_config_error_is_400(harness: Harness) -> None:
    """A policy the requester refuses (ConfigError) is a 400 bad_parameter."""
    harness.classifier.raises = ConfigError("k must not exceed 10")
    resp = await harness.client.post("/v1/classify", data=npy_bytes(np.zeros((28, 28), np.uint8)))
    await assert_error(resp, 400, "bad_parameter")


async def test_classify_without_requester_is_503(make_app: Factory) -> None:
    """A peer built without a requester answers /v1/classify with 503."""
    h = await make_app(classifier=None)
    resp = await h.client.post("/v1/classify", data=npy_bytes(np.zeros((28, 28), np.uint8)))
    await assert_error(resp, 503, "not_a_requester")


async def test_unexpected_exception_is_a_logged_json_500(harness: Harness) -> None:
    """A bug behind a route is logged with its traceback and answered as JSON 500."""
    harness.classifier.raises = RuntimeError("bug")
    with capture_logs() as logs:
        resp = await harness.client.post(
            "/v1/classify", data=npy_bytes(np.zeros((28, 28), np.uint8))
        )
    await assert_error(resp, 500, "internal_error")
    assert any(e["event"] == "http_handler_crashed" and e.get("exc_info") for e in logs)
    assert (await harness.client.get("/healthz")).status == 200


# --- fuzzing -----------------------------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=2048), route=st.sampled_from(["/v1/infer", "/v1/classify"]))
async def test_fuzz_arbitrary_bodies_never_500(harness: Harness, body: bytes, route: str) -> None:
    """Arbitrary bytes to either POST route get a JSON 4xx (or a decision), never a 5xx."""
    resp = await harness.client.post(route, data=body)
    assert resp.status < 500
    if resp.status >= 400:
        assert (await resp.json())["error"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(data=st.data())
async def test_fuzz_near_valid_requests_never_500(harness: Harness, data: st.DataObject) -> None:
    """A valid request with one field replaced by arbitrary JSON is a 4xx, never a 500."""
    obj = json.loads(harness.request_body())
    key = data.draw(st.sampled_from(sorted(obj)))
    value = data.draw(_JSON)
    assume(value != obj[key])
    obj[key] = value
    resp = await harness.client.post("/v1/infer", data=json.dumps(obj))
    assert 400 <= resp.status < 500
    assert (await resp.json())["error"]


@FUZZ
@given(
    query=st.dictionaries(
        st.sampled_from(["rule", "k", "variants", "deadline_ms", "quorum", "x"]),
        st.text(max_size=12),
        max_size=4,
    )
)
async def test_fuzz_classify_query_never_500(harness: Harness, query: dict[str, str]) -> None:
    """Arbitrary values of the classify parameters give 200 or a 400, never a 500."""
    resp = await harness.client.post(
        "/v1/classify", params=query, data=npy_bytes(np.zeros((28, 28), np.uint8))
    )
    assert resp.status in (200, 400)


# --- the server itself -------------------------------------------------------------------


async def test_http_server_binds_each_host_on_one_port(
    tiny_manifest: Manifest, engine: Engine
) -> None:
    """Port 0 picks a free port, bound on every host given; aclose is idempotent."""
    ctx = ServerContext(
        identity=Identity.generate(),
        swarm=SWARM,
        trust=TrustStore.open(),
        model=engine,
        manifest=tiny_manifest,
        table=PeerTable(SWARM),
        metrics=Metrics(),
    )
    server = HttpServer(create_app(ctx), hosts=["127.0.0.1", "127.0.0.2"], port=0)
    async with server:
        assert server.port > 0
        for host in ("127.0.0.1", "127.0.0.2"):
            reader, writer = await asyncio.open_connection(host, server.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 200")
            writer.close()
            await writer.wait_closed()
    await server.aclose()


async def test_http_server_port_in_use_is_config_error(
    tiny_manifest: Manifest, engine: Engine
) -> None:
    """A port another process listens on is a ConfigError that says so."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        ctx = ServerContext(
            identity=Identity.generate(),
            swarm=SWARM,
            trust=TrustStore.open(),
            model=engine,
            manifest=tiny_manifest,
            table=PeerTable(SWARM),
            metrics=Metrics(),
        )
        server = HttpServer(create_app(ctx), hosts=["127.0.0.1"], port=holder.getsockname()[1])
        with pytest.raises(ConfigError, match="already in use"):
            await server.start()
        await server.aclose()
    finally:
        holder.close()
