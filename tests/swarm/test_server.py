"""Tests of swarm.http.api: every public route through aiohttp's test client.

The app runs the real ONNX engine (a tiny model) and its real link server; the requester
behind /v1/classify is a recording fake, since what is pinned here is the HTTP contract
(status codes, JSON errors, parameter checks), not the fan-out (tests/swarm/test_link.py
and test_requester.py pin the links).

Every test that takes the harness runs twice: served by aiohttp's test server, and by the
peer's own ``HttpServer`` (its connection caps and keep-alive limit in front of aiohttp, as
``python -m swarm.peer`` serves). The contract is the same either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from structlog.testing import capture_logs
from yarl import URL

from swarm import PROTOCOL_VERSION, config
from swarm.config import Timings
from swarm.crypto.identity import Identity, TrustStore
from swarm.discovery.table import Announcement, PeerTable
from swarm.errors import ConfigError, NoDecisionError
from swarm.http.api import ServerContext, create_app
from swarm.http.listener import HttpServer
from swarm.inference.engine import Engine
from swarm.inference.imaging import FloatArray
from swarm.inference.manifest import Manifest
from swarm.link.answer import Answerer
from swarm.link.websocket import LinkServer
from swarm.metrics import Metrics
from swarm.requester.call import Policy
from swarm.wire.messages import MAX_DEADLINE_MS

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

    input_shape = config.INPUT_SHAPE

    def __init__(self) -> None:
        self.calls: list[tuple[FloatArray, dict[str, Any]]] = []
        self.raises: Exception | None = None

    async def classify(self, tensor: FloatArray, **kwargs: Any) -> FakeOutcome:
        self.calls.append((tensor, kwargs))
        if self.raises is not None:
            raise self.raises
        return FakeOutcome(label=1)


@dataclasses.dataclass
class Harness:
    client: TestClient[web.Request, web.Application]
    server_identity: Identity
    requester: Identity
    classifier: FakeClassifier
    metrics: Metrics
    table: PeerTable


Factory = Callable[..., Awaitable[Harness]]


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


class PeerTestServer(TestServer):
    """A test server that serves the app as a peer does, with ``HttpServer``; aiohttp's
    test client talks to it like to any server."""

    def __init__(self, app: web.Application, *, timings: Timings) -> None:
        super().__init__(app, host="127.0.0.1")
        self.timings = timings

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.runner is not None:
            return
        self.http = HttpServer(self.app, hosts=[self.host], port=0, timings=self.timings)
        await self.http.start()
        self.runner = self.http._runner
        self.port = self.http.port
        self._root = URL(f"http://{self.host}:{self.port}")

    async def close(self) -> None:
        if self.runner is not None and not self.closed:
            await self.http.aclose()
            self._closed = True


@pytest.fixture(params=["aiohttp", "peer"])
async def make_app(
    request: pytest.FixtureRequest, tiny_manifest: Manifest, engine: Engine
) -> AsyncIterator[Factory]:
    """Builds an app and a test client around it (served by aiohttp's test server, or by
    the peer's ``HttpServer``); closes every client at teardown."""
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
        model = model if model is not None else engine
        answerer = Answerer(
            server_identity, model, swarm=SWARM, family=tiny_manifest.family_id,
            input_shape=config.INPUT_SHAPE,
        )  # fmt: skip
        ctx = ServerContext(
            identity=server_identity,
            swarm=SWARM,
            links=LinkServer.build(
                server_identity, answerer, trust=trust if trust is not None else TrustStore.open()
            ),
            model=model,
            manifest=tiny_manifest,
            table=table,
            metrics=metrics,
            classifier=fake if classifier is ... else classifier,
            **ctx_kw,
        )
        server: TestServer
        if request.param == "peer":
            server = PeerTestServer(create_app(ctx), timings=ctx.timings)
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
            family=tiny_manifest.family_id,
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
    await harness.client.post("/v1/classify", data=b"{}")
    resp = await harness.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'vswarm_requests_total{endpoint="/healthz",status="200"} 1.0' in text
    assert 'vswarm_requests_total{endpoint="/v1/classify",status="400"} 1.0' in text
    assert 'vswarm_peers{state="total"} 0.0' in text


async def test_unknown_path_and_wrong_method_are_json(harness: Harness) -> None:
    """An unknown path is a JSON 404; a wrong method a JSON 405 naming the allowed one."""
    await assert_error(await harness.client.get("/nope"), 404, "not_found")
    body = await assert_error(await harness.client.get("/v1/classify"), 405, "method_not_allowed")
    assert "POST" in body["message"]
    await assert_error(await harness.client.post("/v1/infer"), 404, "not_found")  # retired
    resp = await harness.client.put("/healthz")
    assert resp.headers["Allow"].startswith("GET")
    await assert_error(resp, 405, "method_not_allowed")


# --- /v1/classify ----------------------------------------------------------------------


async def test_classify_npy_uses_defaults(harness: Harness) -> None:
    """An .npy image is decoded and classified with the default rule, k and policy."""
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    resp = await harness.client.post("/v1/classify", data=npy_bytes(pixels))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["label"] == 1
    [(tensor, kwargs)] = harness.classifier.calls
    np.testing.assert_array_equal(tensor[0], pixels)
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
    np.testing.assert_array_equal(tensor[0], pixels)
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
        ({"deadline_ms": str(MAX_DEADLINE_MS + 1)}, "bad_parameter"),
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
@given(body=st.binary(max_size=2048), route=st.sampled_from(["/v1/link", "/v1/classify"]))
async def test_fuzz_arbitrary_bodies_never_500(harness: Harness, body: bytes, route: str) -> None:
    """Arbitrary bytes to either route get a JSON 4xx (or a decision), never a 5xx."""
    resp = await harness.client.post(route, data=body)
    assert resp.status < 500
    if resp.status >= 400:
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
