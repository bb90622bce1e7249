"""Tests of the page's routes (swarm.http.page, swarm.http.view) in-process.

The app is the peer's own (``create_app`` with a ``PageSources``), with the real tiny
engine; the requester behind ``/v1/classify`` is a fake wrapped in the real
``RecordedClassifier``, so what is pinned is what the page serves and streams.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from swarm.config import Timings
from swarm.crypto.identity import Identity
from swarm.decision.reputation import ReputationBook
from swarm.discovery.table import PeerTable
from swarm.errors import NoDecisionError
from swarm.http.api import ServerContext, create_app
from swarm.http.listener import HttpServer
from swarm.http.view import PageSources
from swarm.inference.engine import Engine
from swarm.inference.manifest import Manifest
from swarm.metrics import Metrics
from swarm.requester.events import DecisionFeed, RecordedClassifier
from tests.swarm.announce import announcement, new_key, pid, service
from tests.swarm.test_events import FakeRequester, result

SWARM = "page-swarm"
SEED = bytes(range(32))  # this peer's private key: it must never leave the peer


@dataclasses.dataclass
class Page:
    client: TestClient[web.Request, web.Application]
    identity: Identity
    table: PeerTable
    reputation: ReputationBook
    metrics: Metrics
    feed: DecisionFeed
    inner: FakeRequester
    latency: dict[str, float]


Factory = Callable[..., Awaitable[Page]]


@pytest.fixture
async def engine(tiny_manifest: Manifest) -> AsyncIterator[Engine]:
    async with Engine(tiny_manifest.get("T1")) as eng:
        yield eng


@pytest.fixture
async def make_page(tiny_manifest: Manifest, engine: Engine) -> AsyncIterator[Factory]:
    """Builds a peer's app with (or without) its page and a client for it."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(*, ui: bool = True, feed: DecisionFeed | None = None) -> Page:
        identity = Identity.from_seed(SEED)
        table = PeerTable(SWARM, timings=Timings(backoff_base_s=60.0))
        reputation = ReputationBook()
        metrics = Metrics()
        feed = feed if feed is not None else DecisionFeed()
        inner = FakeRequester(result())
        latency: dict[str, float] = {}
        page = PageSources(
            peer_id=identity.peer_id,
            public_key=identity.public_key_b64,
            swarm=SWARM,
            manifest=tiny_manifest,
            spec=tiny_manifest.get("T1"),
            table=table,
            reputation=reputation,
            metrics=metrics,
            feed=feed,
            latency_ms=latency.get,
            tick_s=0.05,
        )
        ctx = ServerContext(
            identity=identity,
            swarm=SWARM,
            model=engine,
            manifest=tiny_manifest,
            table=table,
            metrics=metrics,
            classifier=RecordedClassifier(inner, feed),
            page=page if ui else None,
        )
        client: TestClient[web.Request, web.Application] = TestClient(
            TestServer(create_app(ctx), host="127.0.0.1")
        )
        await client.start_server()
        clients.append(client)
        return Page(client, identity, table, reputation, metrics, feed, inner, latency)

    yield make
    for client in clients:
        await client.close()


def offer(table: PeerTable, variant: str, sha: str, *, role: str = "peer") -> str:
    key = new_key()
    fields: dict[str, Any] = {"variant": variant, "model_sha256": sha, "role": role}
    if role != "peer":
        fields = {"role": role}
    ann = announcement(SWARM, key=key, port=9000, **fields)
    props = {k.encode(): v.encode() for k, v in ann.txt().items()}
    assert table.offer(service(pid(key)), props, ["127.0.0.1"], 9000) is not None
    return pid(key)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


async def events(resp: aiohttp.ClientResponse, count: int) -> list[tuple[str, Any]]:
    """The next ``count`` Server-Sent Events of a stream, as (event, data)."""
    out: list[tuple[str, Any]] = []
    name = None
    async with asyncio.timeout(10):
        while len(out) < count:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                out.append((str(name), json.loads(line[len("data: ") :])))
    return out


async def test_page_and_its_files_are_served_with_a_strict_policy(make_page: Factory) -> None:
    """GET / is the page; its script and styles come from this peer only, under a policy
    that loads nothing from anywhere else."""
    page = await make_page()
    resp = await page.client.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert '<script src="/ui/app.js"' in html
    policy = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "http" not in html
    texts = {}
    for path, kind in (("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
        asset = await page.client.get(path)
        assert (asset.status, asset.content_type) == (200, kind)
        texts[path] = await asset.text()
    assert "http" not in texts["/ui/style.css"]
    # The script talks to this peer only; its one absolute URL is a link to another
    # peer's page, followed only when the viewer clicks it.
    script = texts["/ui/app.js"]
    assert 'new EventSource("/ui/events")' in script
    assert 'fetch("/v1/classify"' in script
    assert script.count("http://") == 1
    assert "href: `http://${p.address}/`" in script
    for path in ("/ui/index.html", "/ui/../api.py", "/ui/page.py", "/static/app.js"):
        assert (await page.client.get(path)).status == 404


async def test_ui_off_serves_no_page(make_page: Factory) -> None:
    """Without the page (--ui off) its routes answer the API's JSON 404, and classify
    still works."""
    page = await make_page(ui=False)
    for path in ("/", "/ui/state", "/ui/events", "/ui/app.js"):
        resp = await page.client.get(path)
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
    resp = await page.client.post("/v1/classify", data=png(np.zeros((28, 28), np.uint8)))
    assert resp.status == 200


async def test_state_shows_each_peer_as_this_peer_sees_it(
    make_page: Factory, tiny_manifest: Manifest
) -> None:
    """Each peer's variant, family, address, measured latency, reputation and state:
    healthy, backing off, failing, suspected, excluded; a requester; a peer of another
    family."""
    page = await make_page()
    t1, t2, t3 = (tiny_manifest.get(n).sha256 for n in ("T1", "T2", "T3"))
    healthy = offer(page.table, "T2", t2)
    backing = offer(page.table, "T3", t3)
    suspected = offer(page.table, "T1", t1)
    excluded = offer(page.table, "T2", t2)
    failing = offer(page.table, "T3", t3)
    stranger = offer(page.table, "X9", "ef" * 32)
    asker = offer(page.table, "", "", role="requester")
    now = time.monotonic()
    page.table.report_failure(backing, now)
    page.table.report_failure(failing, now - 3600)  # its backoff is over: asked again
    for _ in range(3):
        page.table.report_failure(suspected, now)
    for _ in range(40):
        page.reputation.record(excluded, agreed=False)
        page.reputation.record(healthy, agreed=True)
        page.reputation.record(backing, agreed=True)
    page.latency[healthy] = 12.345
    resp = await page.client.get("/ui/state")
    assert resp.status == 200
    state = await resp.json()
    peers = {p["peer_id"]: p for p in state["peers"]}
    assert {k: peers[k]["state"] for k in peers} == {
        healthy: "healthy",
        backing: "backing off",
        failing: "failing",
        suspected: "suspected",
        excluded: "excluded",
        stranger: "healthy",
        asker: "requester",
    }
    family = tiny_manifest.family_id
    assert peers[healthy]["family"] == family
    assert peers[stranger]["family"] is None
    assert peers[healthy]["latency_ms"] == 12.35
    assert peers[backing]["latency_ms"] is None
    assert peers[healthy]["address"] == "127.0.0.1:9000"
    assert peers[healthy]["reputation"] > peers[excluded]["reputation"]
    assert peers[excluded]["weight"] == 0.0
    assert peers[suspected]["failures"] == 3
    me = state["self"]
    assert (me["peer_id"], me["variant"], me["family"]) == (page.identity.peer_id, "T1", family)
    assert me["public_key"] == page.identity.public_key_b64
    assert me["classes"][1] == "Trouser"


async def test_no_private_key_is_ever_shown(make_page: Factory) -> None:
    """The page, its snapshot and its stream carry public keys only."""
    page = await make_page()
    offer(page.table, "T2", "ab" * 32)
    page.feed.decided(np.zeros((28, 28), np.float32), result())
    secrets = {SEED.hex(), base64.b64encode(SEED).decode(), base64.b64encode(SEED)[:20].decode()}
    texts = [await (await page.client.get(p)).text() for p in ("/", "/ui/state", "/ui/app.js")]
    async with page.client.get("/ui/events") as resp:
        texts.append(json.dumps(await events(resp, 2)))
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert page.identity.public_key_b64 in texts[1]


async def test_stream_says_hello_then_each_decision_then_state(make_page: Factory) -> None:
    """The live stream: the snapshot (with the decisions so far), each classify call this
    peer finishes as it happens, decided or not, and the peers and numbers each tick."""
    page = await make_page()
    page.feed.decided(np.zeros((28, 28), np.float32), result())
    async with page.client.get("/ui/events") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        [(name, hello)] = await events(resp, 1)
        assert name == "hello"
        assert [d["seq"] for d in hello["decisions"]] == [1]
        assert hello["self"]["variant"] == "T1"

        pixels = np.full((28, 28), 200, np.uint8)
        posted = await page.client.post("/v1/classify?rule=median", data=png(pixels))
        assert posted.status == 200
        page.inner.outcome = NoDecisionError(
            "quorum not met", rejected=(("p1", "stale"),), missing=("p2",)
        )
        failed = await page.client.post("/v1/classify", data=png(pixels))
        assert failed.status == 503
        got = await events(resp, 6)
        decisions = [data for name, data in got if name == "decision"]
        assert [d["kind"] for d in decisions] == ["decision", "error"]
        assert decisions[0]["label"] == "Trouser"
        assert decisions[0]["replies"][2]["dissent"] is True
        assert decisions[0]["thumbnail"].startswith("data:image/png;base64,")
        assert decisions[1]["rejected"] == [{"peer": "p1", "reason": "stale"}]
        assert decisions[1]["missing"] == ["p2"]
        states = [data for name, data in got if name == "state"]
        assert states
        assert states[-1]["stats"]["decisions"] == 2
        assert states[-1]["stats"]["no_decision"] == 1
    assert page.inner.calls[0]["rule"] == "median"


async def test_bad_upload_gets_the_api_error_and_no_entry(make_page: Factory) -> None:
    """An upload that is not an image: the classify route's clear 400, nothing published."""
    page = await make_page()
    resp = await page.client.post("/v1/classify", data=b"not an image")
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "malformed_image"
    assert ".npy file" in body["message"]
    assert len(page.feed) == 0
    assert page.inner.calls == []


async def test_too_many_live_views_is_a_clear_503(make_page: Factory) -> None:
    """Live views are bounded; one too many is refused with a reason and Retry-After."""
    page = await make_page(feed=DecisionFeed(max_subscribers=1))
    async with page.client.get("/ui/events") as first:
        await events(first, 1)
        second = await page.client.get("/ui/events")
        assert second.status == 503
        assert second.headers["Retry-After"]
        body = await second.json()
        assert body["error"] == "too_many_views"
        assert "1 live views are open" in body["message"]


async def test_numbers_come_from_the_metrics(make_page: Factory) -> None:
    """Requests served, batch sizes and their mean, model-run and classify p50/p99 (read
    from the metrics' histograms), errors by route and status, rejections by reason."""
    page = await make_page()
    for size, seconds in ((1, 0.0008), (4, 0.0009), (4, 0.002), (16, 0.02)):
        page.metrics.observe_batch(size, seconds)
    page.metrics.observe_classify(0.03, "robust")
    page.metrics.observe_rejection("stale")
    await page.client.post("/v1/classify", data=b"junk")
    stats = (await (await page.client.get("/ui/state")).json())["stats"]
    assert stats["batches"]["count"] == 4
    assert stats["batches"]["inputs"] == 25
    assert stats["batches"]["mean"] == 6.25
    assert dict(stats["batches"]["sizes"])["4"] == 2
    assert 0.5 <= stats["model_ms"]["p50"] <= 1.0  # inside the bucket holding the median
    assert 10.0 <= stats["model_ms"]["p99"] <= 25.0
    assert 25.0 <= stats["classify_ms"]["p50"] <= 50.0
    assert stats["requests"]["/v1/classify"] == 1
    assert stats["errors"] == {"/v1/classify 400": 1}
    assert stats["rejections"] == {"stale": 1}


async def test_stopping_the_server_ends_open_streams(
    tiny_manifest: Manifest, engine: Engine
) -> None:
    """A peer with a page open stops promptly: its shutdown ends the live streams instead
    of waiting for them (served as the peer serves, by HttpServer)."""
    identity = Identity.from_seed(SEED)
    table, metrics, feed = PeerTable(SWARM), Metrics(), DecisionFeed()
    sources = PageSources(
        peer_id=identity.peer_id,
        public_key=identity.public_key_b64,
        swarm=SWARM,
        manifest=tiny_manifest,
        spec=tiny_manifest.get("T1"),
        table=table,
        reputation=ReputationBook(),
        metrics=metrics,
        feed=feed,
        latency_ms=lambda _: None,
    )
    ctx = ServerContext(
        identity=identity,
        swarm=SWARM,
        model=engine,
        manifest=tiny_manifest,
        table=table,
        metrics=metrics,
        page=sources,
        timings=Timings(http_shutdown_s=30.0),
    )
    server = HttpServer(create_app(ctx), hosts=["127.0.0.1"], port=0, timings=ctx.timings)
    await server.start()
    async with aiohttp.ClientSession() as session:
        resp = await session.get(f"http://127.0.0.1:{server.port}/ui/events")
        await events(resp, 1)
        started = time.monotonic()
        await server.aclose()
        assert time.monotonic() - started < 5.0  # not the 30 s grace period
        resp.close()
