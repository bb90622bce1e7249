"""The HTTP API every peer serves (aiohttp).

- ``POST /v1/infer``: a signed request from another peer; a signed top-k reply.
- ``POST /v1/infer/batch``: several requests of one peer signed once; one reply (or an
  error) per item, signed once (``swarm.wire.messages``, "Batches").
- ``POST /v1/session``: a signed key exchange; later requests of that requester may carry
  a session MAC instead of being checked by signature, and their answers carry one too
  (``swarm.crypto.session``).
- ``POST /v1/classify``: an image (PNG, JPEG or .npy); this peer acts as the requester.
- ``GET /v1/info``, ``GET /healthz``, ``GET /metrics`` (Prometheus text format).

``create_app`` builds the application; ``swarm.http.listener.HttpServer`` serves it.

Every body is hostile until checked: it is read with a size limit and a time limit, then
decoded in one place (``wire.decode_request``, ``inference.decode_image``) that raises
our errors only. Every error answer is JSON ``{"error": code, "message": text}`` with a
4xx status, or 503/504 when this peer cannot serve now; a middleware turns anything
unexpected into a logged 500 as a last line, which the tests fuzz for.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, Literal, NoReturn, Protocol, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware

from swarm import PROTOCOL_VERSION, config
from swarm.crypto import session as sessions
from swarm.crypto.identity import Identity, TrustStore, verify_signature
from swarm.decision import voting
from swarm.discovery.mdns import PeerTable
from swarm.errors import (
    ConfigError,
    DecodeError,
    InferenceError,
    MessageTooLargeError,
    NoDecisionError,
    VerificationError,
)
from swarm.http.page import add_page_routes
from swarm.http.view import PageSources
from swarm.inference.engine import FloatArray, Manifest, decode_image
from swarm.log import bound, get_logger
from swarm.metrics import Metrics, render
from swarm.requester.requester import AUTO_WAVE, LocalModel, Policy
from swarm.wire import codec as wire

log = get_logger(__name__)

_M = TypeVar("_M", wire.InferRequest, wire.InferBatch)
_D = TypeVar("_D", wire.InferRequest, wire.InferBatch, wire.SessionHello)

JSON_TYPE: Final = "application/json"
# A verification failure's status: who signed is wrong (401), who signed is not allowed
# (403), it was served already (409); any other failed check is a bad request (400).
VERIFY_STATUS: Final[Mapping[str, int]] = {
    wire.BAD_SIGNATURE: 401,
    wire.WRONG_KEY: 401,
    wire.UNTRUSTED_KEY: 403,
    wire.REPLAYED: 409,
}
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
_ITEM_MESSAGE_CHARS: Final = 300  # an item error's text, as a reply batch allows
# A classify call that outlives its own deadline by this much is cut off here: the
# requester should never let that happen, but the server does not rely on it.
_CLASSIFY_SLACK_S: Final = 1.0


class ClassifyOutcome(Protocol):
    """What the server needs of a decision (``requester.ClassifyResult`` is one)."""

    def to_json(self, image: str | None = None) -> dict[str, Any]: ...


class Classifier(Protocol):
    """What the server needs of a requester (``requester.Requester`` is one)."""

    async def classify(
        self,
        tensor: FloatArray,
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
    trust: TrustStore
    model: LocalModel
    manifest: Manifest
    table: PeerTable
    metrics: Metrics
    classifier: Classifier | None = None
    timings: config.Timings = config.DEFAULT_TIMINGS
    max_infer_in_flight: int = config.MAX_INFER_IN_FLIGHT
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


def error_json(code: str, message: str) -> bytes:
    """The JSON error body every failing route answers with, as bytes."""
    return json.dumps({"error": code, "message": message}).encode()


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The JSON error body every failing route answers with."""
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


_NOT_SESSION_OWNER: Final = VerificationError(
    wire.WRONG_KEY, "the request's requester is not the one that opened this session"
)


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


@dataclasses.dataclass(frozen=True, slots=True)
class PeerAnswer:
    """What a peer-to-peer route answers: a status, a JSON body, and extra headers (the
    session MAC, Retry-After); the HTTP server that carried the request writes it."""

    status: int
    body: bytes
    headers: Mapping[str, str]


# The routes peers call on each other, with each one's body limit. Whichever HTTP server
# carries a request (the lean front of ``swarm.http.front`` or aiohttp), ``PeerCalls`` answers
# it, so the two cannot differ in what they accept or answer.
PEER_ROUTES: Final[Mapping[str, int]] = {
    "/v1/infer": config.MAX_INFER_BODY,
    "/v1/infer/batch": config.MAX_INFER_BATCH_BODY,
    sessions.SESSION_PATH: config.MAX_SESSION_BODY,
}
_SESSION_HEADER: Final = sessions.SESSION_HEADER.lower()
_MAC_HEADER: Final = sessions.MAC_HEADER.lower()


class PeerCalls:
    """The peer-to-peer POST routes, apart from any HTTP framework: ``answer`` takes the
    path, the headers (looked up by lower-case name) and the body read within the
    route's limit (``PEER_ROUTES``), and never raises but for a cancellation."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.replays = wire.ReplayCache()
        self.sessions = sessions.SessionTable(
            ctx.identity, swarm=ctx.swarm, trust=ctx.trust, freshness_s=ctx.timings.freshness_s
        )
        self.slots = _InFlight("/v1/infer", ctx.max_infer_in_flight)
        self._routes: dict[str, Callable[[str, Mapping[str, str], bytes, list[Any]], Any]] = {
            "/v1/infer": self._infer,
            "/v1/infer/batch": self._infer_batch,
            sessions.SESSION_PATH: self._open_session,
        }

    async def answer(self, path: str, headers: Mapping[str, str], body: bytes) -> PeerAnswer:
        """The answer to a POST of ``body`` to ``path`` (one of ``PEER_ROUTES``)."""
        seal: list[tuple[sessions.SessionKeys, bytes]] = []
        extra: dict[str, str] = {}
        try:
            with self.slots.slot():
                out: bytes = await self._routes[path](path, headers, body, seal)
            status = 200
        except _HttpFailure as exc:
            status, out, extra = exc.status, error_json(exc.code, exc.message), exc.headers
        except Exception:
            log.exception("http_handler_crashed", endpoint=path)
            status = 500
            out = error_json("internal_error", "an unexpected error occurred; it was logged")
        if seal:  # authenticated by a session: its answer, whatever it is, carries a MAC
            keys, request_mac = seal[0]
            mac = keys.reply_mac(request_mac, status, out)
            extra[sessions.MAC_HEADER] = base64.b64encode(mac).decode("ascii")
        return PeerAnswer(status, out, extra)

    async def _open_session(
        self, path: str, headers: Mapping[str, str], body: bytes, seal: list[Any]
    ) -> bytes:
        hello = self._decode(body, wire.decode_hello)
        try:
            welcome = self.sessions.open(hello, now_ms=wire.unix_ms())
        except VerificationError as exc:
            self._refuse(exc)
        return wire.encode_welcome(welcome)

    async def _infer(
        self, path: str, headers: Mapping[str, str], body: bytes, seal: list[Any]
    ) -> bytes:
        session = self._authenticate(path, headers, body, seal)
        req = self._decode(body, wire.decode_request)
        # The request's ids go into the few events logged here by name, rather than being
        # bound to the context of every request (which costs more than a log line).
        if session is not None and req.requester_key != session.requester_key:
            self._refuse(_NOT_SESSION_OWNER, **_ids(req))
        reply = await self._answer(req, authenticated=session is not None)
        return wire.encode_reply(reply)

    async def _infer_batch(
        self, path: str, headers: Mapping[str, str], body: bytes, seal: list[Any]
    ) -> bytes:
        ctx = self.ctx
        session = self._authenticate(path, headers, body, seal)
        batch = self._decode(body, wire.decode_batch)
        if session is not None:
            if batch.requester_key != session.requester_key:
                self._refuse(_NOT_SESSION_OWNER)
        # One signature (or the session MAC) for every item; each item's own checks
        # follow in _answer.
        elif not verify_signature(batch.requester_key, batch.signature, batch.signed_bytes()):
            ctx.metrics.observe_rejection(wire.BAD_SIGNATURE)
            log.info("infer_rejected", reason=wire.BAD_SIGNATURE, detail="batch")
            raise _HttpFailure(
                401, wire.BAD_SIGNATURE, "the batch signature does not verify"
            ) from None
        with bound(requester=batch.items[0].requester_id, batch=len(batch.items)):
            # Items are checked as covered by the batch's signature or session MAC.
            items = await asyncio.gather(*(self._answer_item(r) for r in batch.items))
        replies, texts = wire.signed_reply_batch(ctx.identity, items)
        return wire.encode_reply_batch(replies, texts=texts)

    async def _answer_item(self, req: wire.InferRequest) -> wire.InferReply | wire.ItemError:
        try:
            return await self._answer(req, batched=True)
        except _HttpFailure as exc:
            return wire.ItemError(req.request_id, exc.code, exc.message[:_ITEM_MESSAGE_CHARS])

    async def _answer(
        self, req: wire.InferRequest, *, batched: bool = False, authenticated: bool = False
    ) -> wire.InferReply:
        """Verify ``req``, run the model, and answer it: signed, or unsigned as an item of
        a batch whose signature ``batched`` says was verified (the reply batch is signed).
        ``authenticated``: a session MAC proved who sent ``req``; its signature is not
        checked."""
        ctx = self.ctx
        try:
            wire.verify_request(
                req,
                swarm=ctx.swarm,
                trust=ctx.trust,
                now_ms=wire.unix_ms(),
                freshness_s=ctx.timings.freshness_s,
                seen=self.replays,
                signature_verified=batched or authenticated,
            )
        except VerificationError as exc:
            self._refuse(exc, **_ids(req))
        # The requester's budget counts from receipt: clocks of two devices may differ
        # by up to the freshness window, so issued_at_ms cannot anchor it.
        try:
            async with asyncio.timeout(req.deadline_ms / 1000):
                result = await ctx.model.infer(req.tensor())
        except TimeoutError:
            raise _HttpFailure(
                504, "deadline_exceeded", f"the model did not answer within {req.deadline_ms} ms"
            ) from None
        except InferenceError as exc:
            log.warning("infer_failed", error=str(exc), **_ids(req))
            raise _HttpFailure(503, "inference_failed", str(exc)) from None
        spec = ctx.model.spec
        return wire.build_reply(
            ctx.identity,
            req,
            variant=spec.name,
            model_sha256=spec.sha256,
            probs=result.probs,
            infer_us=round(result.seconds * 1_000_000),
            sign=not batched,
        )

    def _decode(self, body: bytes, decode: Callable[[bytes], _D]) -> _D:
        try:
            return decode(body)
        except MessageTooLargeError as exc:
            raise _HttpFailure(413, "body_too_large", str(exc)) from None
        except DecodeError as exc:
            self.ctx.metrics.observe_rejection("malformed")
            raise _HttpFailure(400, "malformed_request", str(exc)) from None

    def _authenticate(
        self, path: str, headers: Mapping[str, str], body: bytes, seal: list[Any]
    ) -> sessions.PeerSession | None:
        """The session whose MAC ``body`` carries; None without a session header."""
        session_id = headers.get(_SESSION_HEADER)
        if session_id is None:
            return None
        session = self.sessions.get(session_id)
        if session is None:
            raise _HttpFailure(
                401,
                sessions.UNKNOWN_SESSION,
                f"this peer holds no session {session_id[:40]!r} (it expired, was "
                f"forgotten, or the peer restarted): open one with POST {sessions.SESSION_PATH}",
            )
        try:
            mac = base64.b64decode(headers.get(_MAC_HEADER, ""), validate=True)
        except (binascii.Error, ValueError):
            mac = b""
        expected = session.keys.request_mac(path, body)
        if len(mac) != sessions.MAC_LEN or not sessions.macs_equal(expected, mac):
            self._refuse(
                VerificationError(
                    wire.BAD_SIGNATURE,
                    f"the {sessions.MAC_HEADER} header is missing or is not the MAC of this "
                    "body in this session",
                )
            )
        seal.append((session.keys, mac))
        return session

    def _refuse(self, exc: VerificationError, **context: str) -> NoReturn:
        """Count and log a failed check (with ``context``, e.g. the request's ids), and
        answer it with its status."""
        self.ctx.metrics.observe_rejection(exc.reason)
        log.info("infer_rejected", reason=exc.reason, detail=exc.detail, **context)
        raise _HttpFailure(VERIFY_STATUS.get(exc.reason, 400), exc.reason, str(exc)) from None


# The app's peer-to-peer routes, for an HTTP server that answers them itself.
PEER_CALLS: Final = web.AppKey("vswarm_peer_calls", PeerCalls)


class _Routes:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.calls = PeerCalls(ctx)
        self.classify_slots = _InFlight("/v1/classify", ctx.max_classify_in_flight)
        self.variant_names = tuple(s.name for s in ctx.manifest.variants)

    # --- peer to peer (the lean front answers these itself; see swarm.http.front) ---

    async def peer_call(self, request: web.Request) -> web.Response:
        path = request.path
        body = await self._read_body(request, PEER_ROUTES[path])
        answer = await self.calls.answer(path, request.headers, body)
        return web.Response(
            status=answer.status, body=answer.body, headers=answer.headers, content_type=JSON_TYPE
        )

    # --- client to requester ---

    async def classify(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        if ctx.classifier is None:
            raise _HttpFailure(503, "not_a_requester", "this peer does not act as a requester")
        params = self._classify_params(request)
        with self.classify_slots.slot():
            body = await self._read_body(request, config.MAX_CLASSIFY_BODY)
            try:
                tensor = decode_image(body, content_type=request.headers.get("Content-Type"))
            except MessageTooLargeError as exc:
                raise _HttpFailure(413, "body_too_large", str(exc)) from None
            except DecodeError as exc:
                raise _HttpFailure(400, "malformed_image", str(exc)) from None
            deadline_ms = params.pop("deadline_ms")
            budget_s = (
                ctx.timings.deadline_s if deadline_ms is None else deadline_ms / 1000
            ) + _CLASSIFY_SLACK_S
            try:
                async with asyncio.timeout(budget_s):
                    outcome = await ctx.classifier.classify(
                        tensor, deadline_ms=deadline_ms, **params
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
            "deadline_ms": _int_param(query, "deadline_ms", None, 1, wire.MAX_DEADLINE_MS),
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


def _ids(req: wire.InferRequest) -> dict[str, str]:
    return {"request_id": req.request_id, "requester": req.requester_id}


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
    for path in PEER_ROUTES:
        app.router.add_post(path, routes.peer_call)
    app[PEER_CALLS] = routes.calls  # the lean front answers these routes with it
    app.router.add_post("/v1/classify", routes.classify)
    app.router.add_get("/v1/info", routes.info)
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_get("/metrics", routes.metrics)
    if ctx.page is not None:
        add_page_routes(app, ctx.page)
    return app
