"""The HTTP API every peer serves (aiohttp), and where its peer link is mounted.

- ``GET /v1/link``: the peer-to-peer link, a WebSocket (``swarm.link.websocket``).
- ``POST /v1/classify``: an image (PNG, JPEG or .npy); this peer acts as the requester.
- ``GET /v1/info``, ``GET /healthz``, ``GET /metrics`` (Prometheus text format).

``create_app`` builds the application; ``swarm.http.listener.HttpServer`` serves it.

Every body is hostile until checked: it is read with a size limit and a time limit, then
decoded in one place (``inference.decode_image``) that raises our errors only. Every error
answer is JSON ``{"error": code, "message": text}`` with a 4xx status, or 503/504 when this
peer cannot serve now; a middleware turns anything unexpected into a logged 500 as a last
line, which the tests fuzz for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final, Literal, NoReturn, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware

from swarm import PROTOCOL_VERSION, config
from swarm.crypto.identity import Identity
from swarm.decision import voting
from swarm.discovery.table import PeerTable
from swarm.errors import (
    ConfigError,
    DecodeError,
    MessageTooLargeError,
    NoDecisionError,
)
from swarm.http.page import add_page_routes
from swarm.http.view import PageSources
from swarm.inference.imaging import PixelArray, decode_image_async
from swarm.inference.manifest import Manifest
from swarm.link.websocket import LinkServer
from swarm.log import get_logger
from swarm.metrics import Metrics, render
from swarm.requester.call import AUTO_WAVE, Policy
from swarm.requester.requester import LocalModel
from swarm.wire.messages import MAX_DEADLINE_MS

log = get_logger(__name__)

JSON_TYPE: Final = "application/json"
CLASSIFY_PARAMS: Final = (
    "rule",
    "k",
    "variants",
    "replicas",
    "wave",
    "deadline_ms",
    "quorum",
)
_HTTP_CODES: Final[Mapping[int, str]] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}
_DIGITS: Final = re.compile(r"[0-9]{1,9}")
_CHUNK: Final = 64 * 1024
# A classify call that outlives its own deadline by this much is cut off here: the
# requester should never let that happen, but the server does not rely on it.
_CLASSIFY_SLACK_S: Final = 1.0


class ClassifyOutcome(Protocol):
    """What the server needs of a decision (``requester.ClassifyResult`` is one)."""

    def to_json(self, image: str | None = None) -> dict[str, Any]: ...


class Classifier(Protocol):
    """What the server needs of a requester (``requester.Requester`` is one)."""

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    async def classify(
        self,
        tensor: PixelArray,
        *,
        rule: str = ...,
        k: int = ...,
        policy: Policy = ...,
        deadline_ms: int | None = ...,
        quorum: int = ...,
    ) -> ClassifyOutcome: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ServerContext:
    """Everything the routes use; the peer builds it once at startup."""

    identity: Identity
    swarm: str
    model: LocalModel
    manifest: Manifest
    table: PeerTable
    metrics: Metrics
    links: LinkServer | None = None  # None: this peer serves no link (not a peer's app)
    classifier: Classifier | None = None
    timings: config.Timings = config.DEFAULT_TIMINGS
    max_classify_in_flight: int = config.MAX_CLASSIFY_IN_FLIGHT
    page: PageSources | None = None  # the page at GET / (swarm.http.page); None: no page


class _HttpFailure(Exception):
    """Raised by a route to answer an error; the middleware renders it as JSON."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The JSON error body every failing route answers with."""
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


class _InFlight:
    """A bounded count of requests being served; full means 503 with Retry-After."""

    def __init__(self, route: str, limit: int) -> None:
        if limit < 1:
            raise ConfigError(f"the in-flight limit of {route} must be >= 1, got {limit}")
        self._route = route
        self._limit = limit
        self.count = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.count >= self._limit:
            raise _HttpFailure(
                503,
                "overloaded",
                f"this peer is serving {self.count} {self._route} requests already; "
                f"retry after {config.RETRY_AFTER_S} s or ask another peer",
                {"Retry-After": str(config.RETRY_AFTER_S)},
            )
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


class _Routes:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.classify_slots = _InFlight("/v1/classify", ctx.max_classify_in_flight)
        # Bodies read at once: each may be MAX_CLASSIFY_BODY, so this bounds their memory.
        self.uploads = asyncio.Semaphore(config.MAX_CLASSIFY_UPLOADS)
        self.variant_names = tuple(s.name for s in ctx.manifest.variants)

    # --- client to requester ---

    async def classify(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        if ctx.classifier is None:
            raise _HttpFailure(503, "not_a_requester", "this peer does not act as a requester")
        params = self._classify_params(request)
        with self.classify_slots.slot():
            async with self.uploads:  # the body is in memory until it is decoded
                body = await self._read_body(request, config.MAX_CLASSIFY_BODY)
                try:
                    pixels = await decode_image_async(
                        body,
                        ctx.classifier.input_shape,
                        content_type=request.headers.get("Content-Type"),
                    )
                except MessageTooLargeError as exc:
                    raise _HttpFailure(413, "body_too_large", str(exc)) from None
                except DecodeError as exc:
                    raise _HttpFailure(400, "malformed_image", str(exc)) from None
                del body
            deadline_ms = params.pop("deadline_ms")
            budget_s = (
                ctx.timings.deadline_s if deadline_ms is None else deadline_ms / 1000
            ) + _CLASSIFY_SLACK_S
            try:
                async with asyncio.timeout(budget_s):
                    outcome = await ctx.classifier.classify(
                        pixels, deadline_ms=deadline_ms, **params
                    )
            except NoDecisionError as exc:
                raise _HttpFailure(503, "no_decision", str(exc)) from None
            except ConfigError as exc:
                raise _HttpFailure(400, "bad_parameter", str(exc)) from None
            except TimeoutError:
                log.exception("classify_overran_deadline", budget_s=budget_s)
                raise _HttpFailure(
                    504, "deadline_exceeded", f"no decision within {budget_s:.3f} s"
                ) from None
        return web.json_response(outcome.to_json())

    def _classify_params(self, request: web.Request) -> dict[str, Any]:
        query = request.query
        for name in query:
            if name not in CLASSIFY_PARAMS:
                _bad_param(f"unknown parameter {name[:40]!r}; known: {', '.join(CLASSIFY_PARAMS)}")
            if len(query.getall(name)) > 1:
                _bad_param(f"parameter {name!r} is given more than once")
        rule = query.get("rule", voting.DEFAULT_RULE)
        if rule not in voting.RULES:
            _bad_param(f"rule must be one of {', '.join(voting.RULES)}, got {rule[:40]!r}")
        return {
            "rule": rule,
            "k": _int_param(query, "k", config.DEFAULT_TOP_K, 1, config.MAX_TOP_K),
            "quorum": _int_param(query, "quorum", 1, 1, config.MAX_PEERS),
            "deadline_ms": _int_param(query, "deadline_ms", None, 1, MAX_DEADLINE_MS),
            "policy": Policy(
                variants=self._variants_param(query.get("variants")),
                replicas=self._all_or_count(query, "replicas", 1),
                wave=self._wave_param(query),
            ),
        }

    def _all_or_count(
        self, query: Mapping[str, str], name: str, default: int | None, forms: str = "'all'"
    ) -> int | None:
        text = query.get(name)
        if text is None:
            return default
        if text == "all":
            return None
        if not text.isdigit() or not 1 <= int(text) <= config.MAX_PEERS:
            _bad_param(f"{name} must be {forms} or an integer in [1, {config.MAX_PEERS}]")
        return int(text)

    def _wave_param(self, query: Mapping[str, str]) -> int | Literal["auto"] | None:
        if query.get("wave", AUTO_WAVE) == AUTO_WAVE:
            return AUTO_WAVE
        return self._all_or_count(query, "wave", None, forms="'auto', 'all'")

    def _variants_param(self, text: str | None) -> tuple[str, ...] | None:
        if text is None or text == "all":
            return None
        names = tuple(dict.fromkeys(n.strip() for n in text.split(",")))
        unknown = [n for n in names if n not in self.variant_names]
        if not names or unknown:
            raise _HttpFailure(
                400,
                "unknown_variant",
                f"unknown variant(s) {', '.join(repr(n[:40]) for n in unknown[:5])}; "
                f"use 'all' or names from: {', '.join(self.variant_names)}",
            )
        return names

    # --- status ---

    async def info(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        spec = ctx.model.spec
        peers = [
            {
                "peer_id": r.peer_id,
                "variant": r.variant,
                "model_sha256": r.model_sha256,
                "role": r.role,
                "addresses": list(r.addresses),
                "port": r.port,
                "failures": r.failures,
                "suspected": r.suspected,
            }
            for r in ctx.table.records()
            if r.peer_id != ctx.identity.peer_id
        ]
        return web.json_response(
            {
                "peer_id": ctx.identity.peer_id,
                "public_key": ctx.identity.public_key_b64,
                "protocol": PROTOCOL_VERSION,
                "swarm": ctx.swarm,
                "family": ctx.manifest.family_id,
                "variant": spec.name,
                "model_sha256": spec.sha256,
                "macs": spec.macs,
                "val_accuracy": spec.val_accuracy,
                "peers": peers,
            }
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "peer_id": self.ctx.identity.peer_id,
                "variant": self.ctx.model.spec.name,
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        table = self.ctx.table
        self.ctx.metrics.set_peer_counts(
            usable=len(table.candidates()), suspected=len(table.suspected()), total=len(table)
        )
        body, content_type = render(self.ctx.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    # --- helpers ---

    async def _read_body(self, request: web.Request, limit: int) -> bytes:
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _HttpFailure(413, "body_too_large", f"body is {declared} bytes; limit {limit}")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.ctx.timings.body_read_timeout_s):
                async for chunk in request.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise _HttpFailure(413, "body_too_large", f"body exceeds {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise _HttpFailure(
                408, "body_timeout", "the request body did not arrive in time"
            ) from None
        except (ConnectionError, HttpProcessingError) as exc:
            raise _HttpFailure(
                400, "incomplete_body", f"the body could not be read: {exc}"
            ) from None
        return b"".join(chunks)


def _bad_param(message: str) -> NoReturn:
    raise _HttpFailure(400, "bad_parameter", message)


def _int_param(
    query: Mapping[str, str], name: str, default: int | None, lo: int, hi: int
) -> int | None:
    text = query.get(name)
    if text is None:
        return default
    if _DIGITS.fullmatch(text) is None or not lo <= int(text) <= hi:
        _bad_param(f"{name} must be an integer in [{lo}, {hi}], got {text[:40]!r}")
    return int(text)


def _endpoint(request: web.Request) -> str:
    # A metrics label from the fixed set of routes, never the peer-supplied path.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _middleware(metrics: Metrics) -> Middleware:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except _HttpFailure as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.headers)
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            code = _HTTP_CODES.get(exc.status, "http_error")
            message = f"{exc.reason}: {request.method} {request.path[:100]}"
            if exc.status == 405:
                message += f"; allowed: {headers.get('Allow', '')}"
            response = error_response(exc.status, code, message, headers)
        except Exception:
            log.exception("http_handler_crashed", endpoint=_endpoint(request))
            response = error_response(
                500, "internal_error", "an unexpected error occurred; it was logged"
            )
        endpoint = _endpoint(request)
        metrics.observe_request(endpoint, response.status)
        log.debug(
            "http_served",
            endpoint=endpoint,
            status=response.status,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return response

    return errors


def create_app(ctx: ServerContext) -> web.Application:
    """The aiohttp application of one peer."""
    routes = _Routes(ctx)
    # aiohttp's own body limit is a backstop; each route reads with its own, smaller one.
    app = web.Application(
        middlewares=[_middleware(ctx.metrics)], client_max_size=config.MAX_CLASSIFY_BODY
    )
    if ctx.links is not None:
        ctx.links.mount(app)
    app.router.add_post("/v1/classify", routes.classify)
    app.router.add_get("/v1/info", routes.info)
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_get("/metrics", routes.metrics)
    if ctx.page is not None:
        add_page_routes(app, ctx.page)
    return app
