"""The requester: one classify call, from an input tensor to a verified, voted decision.

The path of a call (DESIGN.md, "The path of one classify call"):

1. Plan. Of the peer table's candidates, only serving peers whose announced variant is in
   the manifest (and the policy), with the manifest's model sha256 and a trusted key, are
   eligible; others are ignored. Each variant's replicas are ranked by reputation weight
   (excluded peers last: asked only when nothing else serves the variant), then this
   requester's round-trip estimate (an EWMA per peer; a peer never asked is assumed as
   fast as the manifest's model latency, so it gets tried and measured), then fewer
   failures. The policy then drops replicas estimated over its latency budget and,
   most accurate variant first, variants that would overrun its MACs budget.
2. Ask, hedge, verify and exit early: ``swarm.requester.fanout``. The request is signed and encoded
   once for all peers. The peer's own variant is asked in-process (``LocalInfer``).
   Coalescing: one exchange with a peer runs at a time; asks for that peer meanwhile wait
   and go together, when it finishes, as one batch (``POST /v1/infer/batch``) signed
   once each way. A lone call never waits: under concurrency, calls share the HTTP
   exchange and both signatures, and the peer's model runs larger batches. Only when a
   full batch (``config.MAX_BATCH_ITEMS``) waits does a further exchange open, up to
   ``config.REQUESTER_EXCHANGES_PER_PEER``: the peer is then so busy that batches cannot
   grow, and keeping its model fed during the round trip is the gain left.
   Sessions (``swarm.crypto.session``, on by default): the first ask to a peer opens a session
   with one signed key exchange; later requests carry a MAC instead of being checked by
   signature, and a reply whose MAC verifies is known to come from that peer. Its
   signature is then checked only if it dissents from the decision (before the answer)
   or falls in the sample checked after it. A peer without sessions gets signatures.
3. Vote: a ballot weighs the variant's validation accuracy x the peer's reputation weight;
   ``voting.decide`` under the caller's rule.
4. Learn: reputation is recorded from a decision only if ``certified_f >= 1``. A decision
   one reply could flip is a near tie, where honest variants legitimately disagree;
   counting it would wear down the weights of honest peers on the losing side. Excluded
   peers' ballots are recorded too, so they can earn their weight back.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import json
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal, Protocol, TypeVar

import aiohttp
import numpy as np
import numpy.typing as npt

from swarm import PROTOCOL_VERSION, config
from swarm.config import DEFAULT_TIMINGS, Timings
from swarm.crypto.identity import Identity, TrustStore
from swarm.crypto.session import (
    MAC_HEADER,
    SESSION_HEADER,
    SESSION_PATH,
    UNKNOWN_SESSION,
    Offer,
    SessionKeys,
    macs_equal,
)
from swarm.decision import voting
from swarm.decision.reputation import ReputationBook
from swarm.discovery.mdns import PeerRecord, PeerTable
from swarm.errors import (
    ConfigError,
    DecodeError,
    InferenceError,
    NoDecisionError,
    PeerUnreachableError,
    SwarmError,
    VerificationError,
)
from swarm.inference.engine import InferenceResult, Manifest, ModelSpec
from swarm.log import bound, get_logger
from swarm.metrics import Metrics
from swarm.requester.fanout import (
    MALFORMED,
    Answer,
    BatchCheck,
    FanOut,
    Rejection,
    Replicas,
    ReplyInfo,
    Unchecked,
    first_wave_key,
)
from swarm.requester.httpclient import BadAnswer, ConnectFailed, HttpPool
from swarm.resource import AsyncResource
from swarm.wire import codec as wire

__all__ = [
    "DEFAULT_POLICY",
    "MALFORMED",
    "ClassifyResult",
    "LocalInfer",
    "LocalModel",
    "Policy",
    "Rejection",
    "ReplyInfo",
    "Requester",
]

log = get_logger(__name__)
T = TypeVar("T")

INFER_PATH: Final = "/v1/infer"
BATCH_PATH: Final = "/v1/infer/batch"
# Weight of the newest sample in a peer's round-trip estimate: the last few calls count.
LATENCY_ALPHA: Final = 0.3
_HEADERS: Final = {
    "Content-Type": "application/json",
    "Accept-Encoding": "identity",  # a reply is small; nothing to inflate from a peer
    "User-Agent": f"vswarm/{PROTOCOL_VERSION}",
}
_MAC_HEADER_KEY: Final = MAC_HEADER.lower()  # swarm.requester.httpclient lower-cases header names
# A session is renewed this long before the peer said it would forget it.
_SESSION_MARGIN_S: Final = 30.0
_SAMPLER: Final = secrets.SystemRandom()
_MAX_PROBES: Final = 16  # suspected peers probed per round, a bound on the work


def _draw_late_check() -> bool:
    """One draw of the late signature checks' sample (``config.LATE_SIGNATURE_SAMPLE``)."""
    return _SAMPLER.random() < config.LATE_SIGNATURE_SAMPLE


AUTO_WAVE: Final = "auto"


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """Which variants a classify call asks."""

    variants: tuple[str, ...] | None = None  # None: every variant of the manifest
    max_macs: int | None = None  # total MACs (manifest values) of the variants asked
    latency_budget_ms: float | None = None  # skip replicas estimated slower than this
    # Ballots per variant: 1 asks the best replica of each variant (the paper's set-up);
    # None asks every eligible replica, so each peer votes and the vote tolerates up to
    # half of the *peers* lying rather than half of the variants.
    replicas: int | None = 1
    # Ballots asked at once (``swarm.requester.fanout``, "Waves"): None asks every one at once; n
    # asks n, the cheapest per unit of trust, and the rest only if those leave the label
    # open (the same label either way). "auto"
    # (the default) asks every one at once while the requester has fewer than
    # ``config.WAVE_IN_FLIGHT`` calls in flight, and a majority first from there on.
    wave: int | Literal["auto"] | None = AUTO_WAVE

    def __post_init__(self) -> None:
        if self.variants is not None and (
            not isinstance(self.variants, tuple) or not self.variants
        ):
            raise ConfigError("Policy.variants must be a non-empty tuple of names, or None")
        if self.max_macs is not None and self.max_macs < 0:
            raise ConfigError(f"Policy.max_macs must be >= 0, got {self.max_macs}")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise ConfigError(f"Policy.latency_budget_ms must be > 0: {self.latency_budget_ms}")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"Policy.replicas must be >= 1 or None (all), got {self.replicas}")
        if self.wave not in (None, AUTO_WAVE) and (type(self.wave) is not int or self.wave < 1):
            raise ConfigError(
                f"Policy.wave must be 'auto', an integer >= 1 or None (all), got {self.wave!r}"
            )


DEFAULT_POLICY: Final = Policy()


@dataclasses.dataclass(frozen=True, slots=True)
class ClassifyResult:
    """A decision and the evidence behind it (``swarm.requester.fanout`` defines the peer lists)."""

    label: int
    class_name: str
    confidence: float
    certified_f: int
    rule: str
    latency_ms: float
    replies: tuple[ReplyInfo, ...]
    rejected: tuple[Rejection, ...]
    missing: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    request_id: str = ""
    wave: int | None = None  # the ballots asked first, when the call went in waves

    def to_json(self, image: str | None = None) -> dict[str, Any]:
        """The decision as the CLI prints it and ``POST /v1/classify`` returns it."""
        return {
            "image": image,
            "class": self.label,
            "label": self.class_name,
            "confidence": round(self.confidence, 6),
            "certified_f": self.certified_f,
            "latency_ms": round(self.latency_ms, 3),
            "rule": self.rule,
            "replies": [
                {
                    "peer": r.peer,
                    "variant": r.variant,
                    "topk": [[cls, prob] for cls, prob in r.topk],
                    "latency_ms": round(r.latency_ms, 3),
                }
                for r in self.replies
            ],
            "rejected": [{"peer": r.peer, "reason": r.reason} for r in self.rejected],
            "missing": list(self.missing),
            "skipped": list(self.skipped),
            "wave": self.wave,
        }


class LocalModel(Protocol):
    """The local model as ``LocalInfer`` needs it (``inference.Engine`` is one)."""

    @property
    def spec(self) -> ModelSpec: ...

    async def infer(self, x: npt.NDArray[np.float32]) -> InferenceResult: ...


class LocalInfer:
    """This peer's own variant, asked in-process when it is the best replica.

    The requester calls it with the request it signed and its own identity; the reply is
    signed exactly as ``POST /v1/infer`` would sign it, and verified like any other.
    """

    __slots__ = ("_model",)

    def __init__(self, model: LocalModel) -> None:
        self._model = model

    @property
    def spec(self) -> ModelSpec:
        return self._model.spec

    async def __call__(self, request: wire.InferRequest, identity: Identity) -> wire.InferReply:
        result = await self._model.infer(request.tensor())
        spec = self._model.spec
        return wire.build_reply(
            identity,
            request,
            variant=spec.name,
            model_sha256=spec.sha256,
            probs=result.probs,
            infer_us=round(result.seconds * 1_000_000),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _Response:
    """One HTTP answer of a peer: its status, body (bounded) and session MAC header."""

    status: int
    body: bytes
    mac: str | None

    def error(self) -> str:
        """The answer as an error message: its status and, if any, its JSON code and text."""
        obj = self._json()
        if obj is None:
            return f"HTTP {self.status}"
        code, message = str(obj.get("error", ""))[:40], str(obj.get("message", ""))
        return f"HTTP {self.status} {code}: {message[:200]}"

    def code(self) -> str | None:
        """The JSON error code of an error answer, if it has one."""
        obj = self._json()
        code = None if obj is None else obj.get("error")
        return code if isinstance(code, str) else None

    def _json(self) -> dict[str, Any] | None:
        # An error answer is the JSON object every route answers with, or anything at all.
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            obj = json.loads(self.body)
            if isinstance(obj, dict):
                return obj
        return None


@dataclasses.dataclass(slots=True)
class _Waiting:
    """An ask queued behind a peer's busy exchanges, to go in the next batch."""

    request: wire.InferRequest
    body: bytes
    future: asyncio.Future[Answer]


class _Unwanted(Exception):  # a signal between two methods, not an error
    """Every ask an exchange answers ended while it ran (their calls decided without
    it): its reply is left unchecked and undecoded, since no one would read it."""


@dataclasses.dataclass(slots=True)
class _Link:
    """The exchanges with one peer: how many run, and the asks waiting for a turn."""

    busy: int = 0
    waiting: collections.deque[_Waiting] = dataclasses.field(default_factory=collections.deque)


class Requester(AsyncResource):
    """Fans one signed request out to the swarm and votes on the verified replies."""

    def __init__(
        self,
        *,
        identity: Identity,
        swarm: str,
        table: PeerTable,
        manifest: Manifest,
        trust: TrustStore,
        reputation: ReputationBook,
        timings: Timings = DEFAULT_TIMINGS,
        metrics: Metrics | None = None,
        local: LocalInfer | None = None,
        coalesce: bool = True,
        sessions: bool = True,
    ) -> None:
        self.identity = identity
        self.swarm = swarm
        self.table = table
        self.manifest = manifest
        self.trust = trust
        self.reputation = reputation
        self.timings = timings
        self.metrics = metrics
        self.local = local
        self.coalesce = coalesce  # off: every ask is an exchange of its own
        # Asks waiting for a peer that open a further exchange with it while one is out
        # (up to config.REQUESTER_EXCHANGES_PER_PEER); None: a full batch.
        self.further_exchange_at: int | None = None
        # How the slots of a call in waves rank for the first wave, lowest first.
        self.first_wave_key: Callable[[Replicas], Any] = first_wave_key
        self.sessions = sessions  # off: every request and reply is checked by signature
        # peer id -> its session and when to renew it (time.monotonic()); bounded LRU.
        self._keys: collections.OrderedDict[str, tuple[SessionKeys, float]] = (
            collections.OrderedDict()
        )
        self._opening: dict[str, asyncio.Task[SessionKeys | None]] = {}
        self._plain: set[str] = set()  # peers that answered 404 to a session offer
        self._links: dict[str, _Link] = {}
        self._in_flight = 0  # classify calls gathering replies (``Policy.wave`` "auto")
        self._groups: set[asyncio.Task[Any]] = set()  # exchanges, uncoalesced and local asks
        self._session: aiohttp.ClientSession | None = None  # health probes
        self._pool: HttpPool | None = None  # exchanges with peers (swarm.requester.httpclient)
        self._closed = False
        self._probe: asyncio.Task[None] | None = None
        # HTTP exchanges whose caller gave up (early exit, hedge won), left to finish so
        # their keep-alive connection returns to the pool instead of being torn down.
        self._exchanges: set[asyncio.Task[_Response]] = set()
        # peer id -> (round-trip estimate in ms, address that last worked); bounded LRU.
        self._stats: collections.OrderedDict[str, tuple[float | None, str | None]] = (
            collections.OrderedDict()
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._session else "new"
        return f"<Requester {state} swarm={self.swarm!r} peer={self.identity.peer_id}>"

    async def start(self) -> None:
        """Open the HTTP session (calls open it on demand too)."""
        self._open_session()

    async def aclose(self) -> None:
        """Close the HTTP session; idempotent."""
        if self._closed:
            return
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.wait([probe])
        exchanges: set[asyncio.Task[Any]] = {
            *self._exchanges,
            *self._groups,
            *self._opening.values(),
        }
        for task in exchanges:
            task.cancel()
        if exchanges:
            await asyncio.wait(exchanges)
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()

    def latency_ms(self, peer_id: str) -> float | None:
        """This requester's round-trip estimate for ``peer_id``, if it has asked it."""
        return self._stats.get(peer_id, (None, None))[0]

    def available_variants(self, policy: Policy = DEFAULT_POLICY) -> frozenset[str]:
        """The variants a classify call under ``policy`` would ask right now."""
        return frozenset(self._plan(policy)[0])

    async def classify(
        self,
        tensor: npt.NDArray[np.float32],
        *,
        rule: str = voting.DEFAULT_RULE,
        k: int = config.DEFAULT_TOP_K,
        policy: Policy = DEFAULT_POLICY,
        deadline_ms: int | None = None,
        quorum: int = 1,
    ) -> ClassifyResult:
        """Classify one 1x28x28 input; NoDecisionError says why when nothing was decided."""
        self._open_session()
        if rule not in voting.RULES:
            raise ConfigError(f"unknown voting rule {rule!r}: use one of {', '.join(voting.RULES)}")
        if quorum < 1:
            raise ConfigError(f"quorum must be >= 1, got {quorum}")
        if not 1 <= k <= config.MAX_TOP_K:
            raise ConfigError(f"k must be in [1, {config.MAX_TOP_K}], got {k}")
        budget_ms = round(self.timings.deadline_s * 1000) if deadline_ms is None else deadline_ms
        if not 1 <= budget_ms <= wire.MAX_DEADLINE_MS:
            raise ConfigError(
                f"deadline_ms must be in [1, {wire.MAX_DEADLINE_MS}], got {budget_ms}"
            )
        started = time.monotonic()
        plan, weights = self._plan(policy)
        if not plan:
            raise NoDecisionError(
                f"no peer serves a variant this call may ask ({self._wanted(policy)}); "
                f"the peer table holds {len(self.table)} peers, "
                f"{len(self.table.candidates())} usable"
            )
        if quorum > len(plan):
            raise NoDecisionError(
                f"quorum {quorum} cannot be met: only {len(plan)} ballot(s) can be asked "
                f"({', '.join(sorted(plan))})"
            )
        try:
            request = wire.build_request(
                self.identity,
                swarm=self.swarm,
                tensor=tensor,
                k=k,
                deadline_ms=budget_ms,
                sign=not self._all_in_session(plan),
            )
        except ValueError as exc:
            raise ConfigError(f"cannot build the request: {exc}") from exc
        with bound(request_id=request.request_id):
            call = FanOut(
                self,
                request,
                plan=plan,
                weights=weights,
                rule=rule,
                quorum=quorum,
                deadline_at=started + budget_ms / 1000,
                wave=self._wave(policy, len(plan), quorum),
                rank=self.first_wave_key,
            )
            log.debug("classify_started", variants=sorted(plan), rule=rule, deadline_ms=budget_ms)
            self._in_flight += 1
            try:
                early = await call.run()
            finally:
                self._in_flight -= 1
            return self._decide(call, early, budget_ms, started)

    def _wave(self, policy: Policy, slots: int, quorum: int) -> int | None:
        """The ballots a call asks first (None: all at once); see ``Policy.wave``. A
        majority can settle the label alone; ``quorum`` more are needed anyway."""
        if policy.wave != AUTO_WAVE:
            return policy.wave if isinstance(policy.wave, int) else None
        if self._in_flight + 1 < config.WAVE_IN_FLIGHT:
            return None
        return max(quorum, slots // 2 + 1)

    # --- planning ---

    def _wanted(self, policy: Policy) -> str:
        names = policy.variants or tuple(m.name for m in self.manifest.variants)
        return "variants " + ", ".join(names)

    def _plan(self, policy: Policy) -> tuple[dict[str, Replicas], dict[str, float]]:
        if policy.variants is None:
            allowed = {m.name: m for m in self.manifest.variants}
        else:
            allowed = {name: self.manifest.get(name) for name in policy.variants}
        groups: dict[str, list[PeerRecord]] = {}
        for record in self.table.candidates():
            spec = allowed.get(record.variant)
            if spec is None:
                continue
            if record.model_sha256 != spec.sha256 or not self.trust.allows(record.public_key):
                log.debug("peer_not_eligible", peer=record.peer_id, variant=record.variant)
                continue
            groups.setdefault(record.variant, []).append(record)
        weights = self.reputation.weights(r.peer_id for rs in groups.values() for r in rs)
        plan: dict[str, Replicas] = {}
        for name in sorted(groups):
            spec = allowed[name]
            records = groups[name]
            if policy.latency_budget_ms is not None:
                records = [
                    r for r in records if self._estimate(r, spec) <= policy.latency_budget_ms
                ]
            if not records:
                continue
            records.sort(
                key=lambda r: (
                    weights[r.peer_id] == 0.0,
                    -weights[r.peer_id],
                    self._estimate(r, spec),
                    r.failures,
                    r.peer_id,
                )
            )
            # Each slot yields one ballot; its queue holds the replicas it may fail over
            # or hedge to. With r slots, replica i (best first) goes to slot i mod r.
            slots = len(records) if policy.replicas is None else min(policy.replicas, len(records))
            for i in range(slots):
                queue = records[i::slots]
                bound_w = spec.val_accuracy * max(weights[r.peer_id] for r in queue)
                key = name if i == 0 else f"{name}#{i}"
                plan[key] = Replicas(spec, collections.deque(queue), bound_w)
        if policy.max_macs is not None:
            total = 0
            for key, v in sorted(plan.items(), key=lambda i: (-i[1].spec.val_accuracy, i[0])):
                if total + v.spec.macs > policy.max_macs:
                    del plan[key]
                else:
                    total += v.spec.macs
        return plan, weights

    def _estimate(self, record: PeerRecord, spec: ModelSpec) -> float:
        # A peer never asked is judged by the manifest's model latency: optimistic, so a
        # new replica gets asked once and measured.
        measured = self.latency_ms(record.peer_id)
        return spec.latency_ms if measured is None else measured

    def observe_latency(self, peer_id: str, ms: float, *, censored: bool = False) -> None:
        """Feed a round trip into the estimate; a censored one (cut off) only raises it."""
        old, address = self._stats.pop(peer_id, (None, None))
        if censored and old is not None and ms <= old:
            new: float | None = old
        else:
            new = ms if old is None else old + LATENCY_ALPHA * (ms - old)
        self._stats[peer_id] = (new, address)
        while len(self._stats) > config.MAX_PEERS:
            self._stats.popitem(last=False)

    # --- asking ---

    def _all_in_session(self, plan: dict[str, Replicas]) -> bool:
        """Whether every peer the call may ask (hedges included) holds a live session
        with this requester, so that MACs authenticate the request and its signature
        would go unchecked (its own peer's in-process model checks none either)."""
        if not self.sessions:
            return False
        now = time.monotonic()
        local = self.local
        for variant in plan.values():
            for record in variant.queue:
                if local is not None and self._is_local(record, local.spec):
                    continue
                held = self._keys.get(record.peer_id)
                if held is None or held[1] <= now:
                    return False
        return True

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ConfigError("the requester is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=config.REQUESTER_MAX_CONNECTIONS,
                limit_per_host=config.REQUESTER_MAX_CONNECTIONS_PER_PEER,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.timings.connect_timeout_s
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers=_HEADERS,
            )
            self._pool = HttpPool(
                per_host=config.REQUESTER_MAX_CONNECTIONS_PER_PEER,
                connect_timeout_s=self.timings.connect_timeout_s,
                headers=_HEADERS,
            )
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_suspected(), name="vswarm-probe"
            )
        return self._session

    async def _probe_suspected(self) -> None:
        """Bring suspected peers back once they answer again.

        A suspected peer is never chosen, so no call would ever learn that it recovered
        (after a partition heals, say, a peer does not re-announce). Every
        ``probe_interval_s`` its health endpoint is asked, with a short timeout.
        """
        interval = self.timings.probe_interval_s
        while True:
            await asyncio.sleep(interval)
            session = self._session
            if session is None:
                return
            for record in self.table.suspected()[:_MAX_PROBES]:
                if await self._healthy(session, record):
                    self.table.report_success(record.peer_id)

    async def _healthy(self, session: aiohttp.ClientSession, record: PeerRecord) -> bool:
        for address in record.addresses:
            try:
                async with (
                    asyncio.timeout(self.timings.connect_timeout_s),
                    session.get(f"http://{address}:{record.port}/healthz") as resp,
                ):
                    if resp.status == 200:
                        return True
            except (TimeoutError, aiohttp.ClientError, OSError):
                continue
        return False

    def ask_peer(
        self, record: PeerRecord, request: wire.InferRequest, body: bytes
    ) -> asyncio.Future[Answer]:
        """One peer's decoded reply, or a SwarmError, as a future; the caller bounds the
        time, and cancels the future when it gives up. Coalesced, an ask is a plain
        future, no task of its own, queued for the peer (``_flush``): it goes at once
        when no exchange with that peer is out. The exchange runs in a task nothing but
        ``aclose`` cancels; a cancelled ask is skipped, or its answer dropped."""
        local = self.local
        if local is not None and self._is_local(record, local.spec):
            return self._task(self._ask_local(local, request), "vswarm-local")
        if not self.coalesce:
            return self._task(self._ask_one(record, request, body), "vswarm-ask")
        link = self._links.setdefault(record.peer_id, _Link())
        waiting = _Waiting(request, body, asyncio.get_running_loop().create_future())
        link.waiting.append(waiting)
        self._flush(link, record)  # a free link, or a full batch, opens an exchange now
        return waiting.future

    def _task(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """``work`` as a task of this requester's: ``aclose`` cancels what is still out."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._groups.add(task)
        task.add_done_callback(self._groups.discard)
        return task

    async def _ask_local(self, local: LocalInfer, request: wire.InferRequest) -> Answer:
        try:
            return Answer(await local(request, self.identity))
        except SwarmError:
            raise
        except Exception as exc:  # a bug there must cost one reply, not the call
            log.exception("local_infer_crashed")
            raise InferenceError(f"the local model failed: {exc!r}") from exc

    def _may_open(self, link: _Link, waiting: int) -> bool:
        """Whether an exchange for ``waiting`` asks may open with the peer now: the first
        at once; a further one, up to ``config.REQUESTER_EXCHANGES_PER_PEER``, only for a
        full batch (``further_exchange_at``), when the peer is so busy that batches cannot
        grow and keeping its model fed during the round trip is the gain left."""
        if not link.busy:
            return True
        at = (
            config.MAX_BATCH_ITEMS if self.further_exchange_at is None else self.further_exchange_at
        )
        return link.busy < config.REQUESTER_EXCHANGES_PER_PEER and waiting >= at

    def _flush(self, link: _Link, record: PeerRecord) -> None:
        """Send what waits for ``record``'s peer, as batches, while exchanges may open."""
        while link.waiting and self._may_open(link, len(link.waiting)):
            group: list[_Waiting] = []
            while link.waiting and len(group) < config.MAX_BATCH_ITEMS:
                waiting = link.waiting.popleft()
                if not waiting.future.done():
                    group.append(waiting)
            if not group:
                break
            link.busy += 1
            self._task(self._send_group(link, record, group), "vswarm-batch")
        if not link.busy and not link.waiting:
            self._links.pop(record.peer_id, None)

    async def _send_group(self, link: _Link, record: PeerRecord, group: list[_Waiting]) -> None:
        def unwanted() -> bool:
            return all(waiting.future.done() for waiting in group)

        try:
            if len(group) == 1:
                only = group[0]
                answers: list[Answer | SwarmError] = [
                    await self._ask_one(record, only.request, only.body, unwanted=unwanted)
                ]
            else:
                answers = await self._ask_batch(record, group, unwanted=unwanted)
        except _Unwanted:
            return  # every ask of the group has ended: no one reads the reply
        except SwarmError as exc:
            answers = [exc] * len(group)
        except Exception as exc:  # a bug here must fail these asks, not hang them
            log.exception("batch_ask_crashed", peer=record.peer_id)
            answers = [InferenceError(f"the batch to {record.peer_id} failed: {exc!r}")] * len(
                group
            )
        finally:
            link.busy -= 1
            self._flush(link, record)
        for waiting, answer in zip(group, answers, strict=True):
            if waiting.future.done():
                continue
            if isinstance(answer, Answer):
                waiting.future.set_result(answer)
            else:
                waiting.future.set_exception(_copy_error(answer))

    async def _ask_one(
        self,
        record: PeerRecord,
        request: wire.InferRequest,
        body: bytes,
        *,
        unwanted: Callable[[], bool] | None = None,
    ) -> Answer:
        raw, authenticated = await self._call(
            record, INFER_PATH, body, request.deadline_ms / 1000, unwanted=unwanted
        )
        return Answer(wire.decode_reply(raw), mac_verified=authenticated)

    async def _ask_batch(
        self,
        record: PeerRecord,
        group: list[_Waiting],
        *,
        unwanted: Callable[[], bool] | None = None,
    ) -> list[Answer | SwarmError]:
        """Ask ``requests`` as one batch; a whole-batch failure raises, an item's is listed.

        In a session the MACs authenticate both batches: the requester does not sign its
        batch (the peer would not check it), and the reply batch's signature is checked
        like a single reply's, for dissenters and a sample (``FanOut.confirm_dissent``).
        """
        requests = [w.request for w in group]
        limit_s = max(r.deadline_ms for r in requests) / 1000
        in_session = self.sessions and await self._session_for(record, limit_s) is not None
        batch = wire.build_batch(self.identity, requests, sign=not in_session)
        raw, authenticated = await self._call(
            record,
            BATCH_PATH,
            wire.encode_batch(batch, bodies=[w.body for w in group]),  # each encoded once
            limit_s,
            config.MAX_REPLY_BATCH_BODY,
            unwanted=unwanted,
        )
        replies = wire.decode_reply_batch(raw)
        if len(replies.items) != len(requests):
            raise DecodeError(
                f"reply batch has {len(replies.items)} items for {len(requests)} requests"
            )
        wire.verify_reply_batch(
            replies,
            expected_peer_id=record.peer_id,
            expected_key=record.public_key,
            check_signature=not authenticated,
        )
        shared = BatchCheck(replies, record) if authenticated else None
        return [
            Answer(item, batch_verified=not authenticated, mac_verified=authenticated, batch=shared)
            if isinstance(item, wire.InferReply)
            else PeerUnreachableError(f"batch item refused: {item.error}: {item.message}")
            for item in replies.items
        ]

    async def _call(
        self,
        record: PeerRecord,
        path: str,
        body: bytes,
        limit_s: float,
        max_reply: int = config.MAX_REPLY_BODY,
        *,
        retry: bool = True,
        unwanted: Callable[[], bool] | None = None,
    ) -> tuple[bytes, bool]:
        """The body of ``record``'s 200 answer to ``body`` at ``path``, and whether a
        session MAC proved that peer sent it. An error answer raises PeerUnreachableError,
        a reply whose MAC does not verify VerificationError; ``_Unwanted`` if ``unwanted``
        says, once the answer is in, that no one waits for it any more (it goes unchecked)."""
        keys = await self._session_for(record, limit_s) if self.sessions else None
        if keys is None:
            resp = await self._post_to(record, path, body, limit_s, max_reply)
            if unwanted is not None and unwanted():
                raise _Unwanted
            if resp.status != 200:
                raise PeerUnreachableError(resp.error())
            return resp.body, False
        request_mac = keys.request_mac(path, body)
        resp = await self._post_to(record, path, body, limit_s, max_reply, keys, request_mac)
        forgotten = resp.status == 401 and resp.code() == UNKNOWN_SESSION and retry
        if forgotten:  # the peer forgot the session (restart, expiry, a full table)
            self._forget_session(record.peer_id, keys)
        if unwanted is not None and unwanted():
            raise _Unwanted  # a session forgotten is opened by the next call
        if forgotten:  # open another, and ask again
            return await self._call(
                record, path, body, limit_s, max_reply, retry=False, unwanted=unwanted
            )
        if resp.status != 200:
            raise PeerUnreachableError(resp.error())
        try:
            mac = base64.b64decode(resp.mac or "", validate=True)
        except (binascii.Error, ValueError):
            mac = b""
        if not macs_equal(keys.reply_mac(request_mac, resp.status, resp.body), mac):
            raise VerificationError(
                wire.BAD_SIGNATURE, "the reply's session MAC is missing or does not verify"
            )
        return resp.body, True

    async def _session_for(self, record: PeerRecord, limit_s: float) -> SessionKeys | None:
        """This requester's session with ``record``'s peer, opened if need be; None for a
        peer that has no sessions."""
        peer_id = record.peer_id
        held = self._keys.get(peer_id)
        if held is not None and held[1] > time.monotonic():
            self._keys.move_to_end(peer_id)
            return held[0]
        if peer_id in self._plain:
            return None
        opening = self._opening.get(peer_id)
        if opening is None:
            # Its own task: a caller that gives up (early exit) leaves it to finish for
            # the next call, and concurrent callers share one key exchange.
            opening = asyncio.get_running_loop().create_task(
                self._open_session_with(record, limit_s), name="vswarm-session"
            )
            self._opening[peer_id] = opening
            opening.add_done_callback(lambda task: self._session_opened(peer_id, task))
        return await asyncio.shield(opening)

    def _session_opened(self, peer_id: str, task: asyncio.Task[Any]) -> None:
        if self._opening.get(peer_id) is task:
            del self._opening[peer_id]
        if not task.cancelled():
            task.exception()  # retrieved: its callers raise it

    async def _open_session_with(self, record: PeerRecord, limit_s: float) -> SessionKeys | None:
        offer = Offer(self.identity, self.swarm)
        resp = await self._post_to(
            record,
            SESSION_PATH,
            wire.encode_hello(offer.hello),
            limit_s,
            config.MAX_SESSION_BODY,
        )
        if resp.status == 404:  # a peer without sessions: signatures it is
            if len(self._plain) >= config.MAX_PEERS:  # a bound: asking again is harmless
                self._plain.clear()
            self._plain.add(record.peer_id)
            log.info("peer_without_sessions", peer=record.peer_id)
            return None
        if resp.status != 200:
            raise PeerUnreachableError(f"session refused: {resp.error()}")
        welcome = wire.decode_welcome(resp.body)
        keys = offer.accept(
            welcome,
            expected_peer_id=record.peer_id,
            expected_key=record.public_key,
            now_ms=wire.unix_ms(),
            freshness_s=self.timings.freshness_s,
        )
        ttl_s = min(welcome.ttl_ms / 1000, config.SESSION_TTL_S)
        renew_at = time.monotonic() + max(ttl_s - _SESSION_MARGIN_S, ttl_s / 2)
        self._keys[record.peer_id] = (keys, renew_at)
        self._keys.move_to_end(record.peer_id)
        while len(self._keys) > config.MAX_PEERS:
            self._keys.popitem(last=False)
        log.debug("session_opened", peer=record.peer_id, ttl_s=ttl_s)
        return keys

    def _forget_session(self, peer_id: str, keys: SessionKeys) -> None:
        held = self._keys.get(peer_id)
        if held is not None and held[0] is keys:
            del self._keys[peer_id]

    async def _post_to(
        self,
        record: PeerRecord,
        path: str,
        body: bytes,
        limit_s: float,
        max_reply: int = config.MAX_REPLY_BODY,
        keys: SessionKeys | None = None,
        request_mac: bytes = b"",
    ) -> _Response:
        """POST ``body`` to ``record``'s peer, trying its addresses, the last good first;
        with ``keys``, in that session, the MAC ``request_mac`` in its headers."""
        headers = (
            None
            if keys is None
            else {
                SESSION_HEADER: keys.session_id,
                MAC_HEADER: base64.b64encode(request_mac).decode("ascii"),
            }
        )
        self._open_session()
        preferred = self._stats.get(record.peer_id, (None, None))[1]
        addresses = sorted(record.addresses, key=lambda a: a != preferred)
        last: Exception | None = None
        for address in addresses:
            try:
                resp = await self._exchange(
                    address, record.port, path, body, limit_s, max_reply, headers
                )
            except ConnectFailed as exc:
                last = exc  # this address does not reach the peer; try the next one
                continue
            except (BadAnswer, aiohttp.ClientError) as exc:
                raise PeerUnreachableError(f"{address}:{record.port}: {exc}") from exc
            if address != preferred:
                self._stats[record.peer_id] = (self.latency_ms(record.peer_id), address)
            return resp
        raise PeerUnreachableError(f"cannot connect to {addresses} port {record.port}: {last!r}")

    async def _exchange(
        self,
        address: str,
        port: int,
        path: str,
        body: bytes,
        limit_s: float,
        max_reply: int = config.MAX_REPLY_BODY,
        headers: dict[str, str] | None = None,
    ) -> _Response:
        # Cancelling an exchange mid-answer closes its connection, and the next call to
        # that peer pays a new TCP handshake; early exit and hedging cancel the slowest
        # ask of most calls. So the exchange runs in its own task, bounded by the
        # request's budget, and a cancelled caller leaves it to finish in the background.
        task = asyncio.create_task(
            self._post(address, port, path, body, limit_s, max_reply, headers),
            name="vswarm-post",
        )
        self._exchanges.add(task)
        task.add_done_callback(_exchange_done(self._exchanges))
        return await asyncio.shield(task)

    async def _post(
        self,
        address: str,
        port: int,
        path: str,
        body: bytes,
        limit_s: float,
        max_reply: int,
        headers: dict[str, str] | None,
    ) -> _Response:
        pool = self._pool
        if pool is None:
            raise ConfigError("the requester is closed")
        async with asyncio.timeout(limit_s):
            answer = await pool.post(address, port, path, body, headers=headers, max_body=max_reply)
        return _Response(answer.status, answer.body, answer.headers.get(_MAC_HEADER_KEY))

    def _is_local(self, record: PeerRecord, spec: ModelSpec) -> bool:
        return record.peer_id == self.identity.peer_id and (
            record.variant,
            record.model_sha256,
        ) == (spec.name, spec.sha256)

    # --- deciding ---

    def _sample_signatures(self, call: FanOut) -> None:
        """Check, after the answer, the signatures of a sample of the replies that only
        their session vouched for: a peer that signs garbage is found out and loses
        reputation, at a fraction of the cost of checking every reply. The replies of one
        batch share its draw: one check covers them all."""
        sample = [u for u in call.unchecked.values() if u.sampled(_draw_late_check)]
        if sample:
            asyncio.get_running_loop().call_soon(self._check_late, sample)

    def _check_late(self, sample: list[Unchecked]) -> None:
        for unchecked in sample:
            record, reply = unchecked.record, unchecked.reply
            try:
                unchecked.check()
            except VerificationError as exc:
                # The session MAC proved this peer sent it: provably its own bad reply.
                self.reputation.record(record.peer_id, agreed=False)
                if self.metrics is not None:
                    self.metrics.observe_rejection(exc.reason)
                log.warning("late_bad_signature", peer=record.peer_id, request=reply.request_id)

    def _decide(self, call: FanOut, early: bool, budget_ms: int, started: float) -> ClassifyResult:
        _check_quorum(call, budget_ms)
        decision = voting.decide(call.ballots, call.rule)
        # A dissenting reply only its session vouched for has its signature checked now;
        # one that fails is dropped, and the vote taken again without it.
        while call.confirm_dissent(decision.label):
            _check_quorum(call, budget_ms)
            decision = voting.decide(call.ballots, call.rule)
        self._sample_signatures(call)
        if decision.certified_f >= 1:
            for ballot in call.ballots:
                agreed = voting.top_class(ballot.topk) == decision.label
                self.reputation.record(ballot.peer_id, agreed)
        seconds = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.observe_classify(seconds, call.rule)
        log.info(
            "classify_decided",
            label=decision.label,
            certified_f=decision.certified_f,
            replies=len(call.replies),
            rejected=len(call.rejected),
            missing=len(call.missing),
            skipped=len(call.skipped),
            early_exit=early,
            ms=round(seconds * 1000, 3),
        )
        return ClassifyResult(
            label=decision.label,
            class_name=self.manifest.class_names[decision.label],
            confidence=decision.confidence,
            certified_f=decision.certified_f,
            rule=call.rule,
            latency_ms=seconds * 1000,
            replies=tuple(call.replies),
            rejected=tuple(call.rejected),
            missing=tuple(call.missing),
            skipped=tuple(call.skipped),
            request_id=call.request.request_id,
            wave=call.wave,
        )


def _check_quorum(call: FanOut, budget_ms: int) -> None:
    counted = sum(1 for b in call.ballots if b.weight > 0)
    if counted < call.quorum:
        what = (
            "no counted replies"
            if counted == 0
            else f"quorum not met ({counted} counted replies, {call.quorum} required)"
        )
        message = f"{what} from {call.asked} peers within {budget_ms} ms: {call.summary()}"
        log.warning("classify_no_decision", reason=message)
        raise NoDecisionError(
            message,
            rejected=tuple((r.peer, r.reason) for r in call.rejected),
            missing=tuple(call.missing),
        )


def _copy_error(exc: SwarmError) -> SwarmError:
    """``exc`` for one more waiting caller: each task gets its own exception object, or
    every caller's traceback would pile onto one."""
    if isinstance(exc, VerificationError):
        copy: SwarmError = VerificationError(exc.reason, exc.detail)
    else:
        try:
            copy = type(exc)(str(exc))
        except TypeError:  # a subclass with another constructor
            copy = PeerUnreachableError(str(exc))
    copy.__cause__ = exc
    return copy


def _exchange_done(
    pending: set[asyncio.Task[_Response]],
) -> Callable[[asyncio.Task[_Response]], None]:
    def done(task: asyncio.Task[_Response]) -> None:
        pending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that gave up does not want it logged

    return done
