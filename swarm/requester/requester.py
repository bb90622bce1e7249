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
2. Ask, hedge, verify and exit early: ``swarm.requester.fanout``. The request is built
   once (its input in compact form) for all peers, which are asked through the transport
   (``swarm.link``): one kept link per peer, sealed both ways. The peer's own variant is
   asked in-process (``LocalInfer``). Coalescing: one exchange with a peer runs at a time;
   asks for that peer meanwhile wait and go together, when it finishes, as one group
   whose replies are signed once. A lone call never waits: under concurrency, calls share
   the round trip and the signature, and the peer's model runs larger batches. Only when a
   full group (``config.MAX_BATCH_ITEMS``) waits does a further exchange open, up to
   ``config.REQUESTER_EXCHANGES_PER_PEER``: the peer is then so busy that batches cannot
   grow, and keeping its model fed during the round trip is the gain left. The link
   proves which peer sent a reply; its signature is checked only where it matters: every
   reply that dissents from the decision before the answer, a sample of the others after.
3. Vote: a ballot weighs the variant's validation accuracy x the peer's reputation weight;
   ``voting.decide`` under the caller's rule.
4. Learn: reputation is recorded from a decision only if ``certified_f >= 1``. A decision
   one reply could flip is a near tie, where honest variants legitimately disagree;
   counting it would wear down the weights of honest peers on the losing side. Excluded
   peers' ballots are recorded too, so they can earn their weight back.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import secrets
import time
from collections.abc import Coroutine
from typing import Any, Final, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from swarm import config
from swarm.config import DEFAULT_TIMINGS, Timings
from swarm.crypto.identity import Identity, TrustStore
from swarm.decision import voting
from swarm.decision.reputation import ReputationBook
from swarm.discovery.table import PeerRecord, PeerTable
from swarm.errors import (
    ConfigError,
    InferenceError,
    NoDecisionError,
    PeerTimeoutError,
    PeerUnreachableError,
    SwarmError,
    VerificationError,
)
from swarm.inference.engine import InferenceResult
from swarm.inference.manifest import Manifest, ModelSpec
from swarm.link.transport import LinkConfig, Transport
from swarm.link.websocket import WebSocketTransport
from swarm.log import bound, get_logger
from swarm.metrics import Metrics
from swarm.requester.call import AUTO_WAVE, DEFAULT_POLICY, ClassifyResult, Policy
from swarm.requester.fanout import (
    Answer,
    BatchCheck,
    FanOut,
    Replicas,
    Unchecked,
)
from swarm.resource import AsyncResource
from swarm.wire import codec
from swarm.wire.messages import MAX_DEADLINE_MS, InferReply, InferRequest, build_request

__all__ = ["LocalInfer", "LocalModel", "Requester"]

log = get_logger(__name__)
T = TypeVar("T")

# Weight of the newest sample in a peer's round-trip estimate: the last few calls count.
LATENCY_ALPHA: Final = 0.3
_SAMPLER: Final = secrets.SystemRandom()
_MAX_PROBES: Final = 16  # suspected peers probed per round, a bound on the work


def _draw_late_check() -> bool:
    """One draw of the late signature checks' sample (``config.LATE_SIGNATURE_SAMPLE``)."""
    return _SAMPLER.random() < config.LATE_SIGNATURE_SAMPLE


class LocalModel(Protocol):
    """The local model as ``LocalInfer`` needs it (``inference.Engine`` is one)."""

    @property
    def spec(self) -> ModelSpec: ...

    async def infer(self, x: npt.NDArray[np.float32]) -> InferenceResult: ...


class LocalInfer:
    """This peer's own variant, asked in-process when it is the best replica.

    Its reply is built exactly as the peer answers a link's ask, and checked like any
    other; it needs no signature, being the requester's own.
    """

    __slots__ = ("_model",)

    def __init__(self, model: LocalModel) -> None:
        self._model = model

    @property
    def spec(self) -> ModelSpec:
        return self._model.spec

    async def __call__(self, request: InferRequest, responder_id: str) -> InferReply:
        result = await self._model.infer(request.tensor())
        spec = self._model.spec
        return codec.build_reply(
            request,
            responder_id=responder_id,
            variant=spec.name,
            model_sha256=spec.sha256,
            probs=result.probs,
            infer_us=round(result.seconds * 1_000_000),
        )


@dataclasses.dataclass(slots=True)
class _Waiting:
    """An ask queued behind a peer's busy exchanges, to go in the next group."""

    request: InferRequest
    future: asyncio.Future[Answer]


@dataclasses.dataclass(slots=True)
class _Queue:
    """The exchanges with one peer: how many run, and the asks waiting for a turn."""

    busy: int = 0
    waiting: collections.deque[_Waiting] = dataclasses.field(default_factory=collections.deque)


class Requester(AsyncResource):
    """Fans one request out to the swarm and votes on the verified replies."""

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
        transport: Transport | None = None,
    ) -> None:
        self.identity = identity
        self.swarm = swarm
        self.table = table
        self.manifest = manifest
        self.family = manifest.family_id
        self.input_shape = manifest.input.shape
        self.trust = trust
        self.reputation = reputation
        self.timings = timings
        self.metrics = metrics
        self.local = local
        self.coalesce = coalesce  # off: every ask is an exchange of its own
        # The links to peers (``swarm.link``); WebSockets unless a test gives another.
        self.transport: Transport = transport or WebSocketTransport(
            LinkConfig(identity, swarm, self.family, timings.freshness_s), timings=timings
        )
        self._queues: dict[str, _Queue] = {}
        self._in_flight = 0  # classify calls gathering replies (``Policy.wave`` "auto")
        self._tasks: set[asyncio.Task[Any]] = set()  # exchanges, uncoalesced and local asks
        self._closed = False
        self._probe: asyncio.Task[None] | None = None
        # peer id -> round-trip estimate in ms; bounded LRU.
        self._stats: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._probe else "new"
        return f"<Requester {state} swarm={self.swarm!r} peer={self.identity.peer_id}>"

    async def start(self) -> None:
        """Start probing suspected peers (calls start it on demand too)."""
        self._started()

    async def aclose(self) -> None:
        """Cancel what is still out and close the links; idempotent."""
        if self._closed:
            return
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.wait([probe])
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            for waiting in queue.waiting:
                if not waiting.future.done():
                    waiting.future.set_exception(PeerUnreachableError("the requester closed"))
        await self.transport.aclose()

    def latency_ms(self, peer_id: str) -> float | None:
        """This requester's round-trip estimate for ``peer_id``, if it has asked it."""
        return self._stats.get(peer_id)

    def available_variants(self, policy: Policy = DEFAULT_POLICY) -> frozenset[str]:
        """The variants a classify call under ``policy`` would ask right now."""
        return frozenset(self._plan(policy)[0])

    async def classify(
        self,
        tensor: npt.NDArray[np.float32] | npt.NDArray[np.uint8],
        *,
        rule: str = voting.DEFAULT_RULE,
        k: int = config.DEFAULT_TOP_K,
        policy: Policy = DEFAULT_POLICY,
        deadline_ms: int | None = None,
        quorum: int = 1,
    ) -> ClassifyResult:
        """Classify one input (the family's C x H x W: uint8 pixels, or floats in [0, 1]);
        NoDecisionError says why when nothing was decided."""
        self._started()
        if rule not in voting.RULES:
            raise ConfigError(f"unknown voting rule {rule!r}: use one of {', '.join(voting.RULES)}")
        if quorum < 1:
            raise ConfigError(f"quorum must be >= 1, got {quorum}")
        if not 1 <= k <= config.MAX_TOP_K:
            raise ConfigError(f"k must be in [1, {config.MAX_TOP_K}], got {k}")
        budget_ms = round(self.timings.deadline_s * 1000) if deadline_ms is None else deadline_ms
        if not 1 <= budget_ms <= MAX_DEADLINE_MS:
            raise ConfigError(f"deadline_ms must be in [1, {MAX_DEADLINE_MS}], got {budget_ms}")
        started = time.monotonic()
        plan, weights = self._plan(policy)
        if not plan:
            others = {
                r.family for r in self.table.candidates() if r.family and r.family != self.family
            }
            hint = (
                f"; {len(others)} other famil{'y' if len(others) == 1 else 'ies'} "
                f"({', '.join(sorted(others)[:3])}) are served here: ask with the family folder "
                f"they serve (--family DIR), this requester's is {self.family}"
                if others
                else ""
            )
            raise NoDecisionError(
                f"no peer serves a variant this call may ask ({self._wanted(policy)}); "
                f"the peer table holds {len(self.table)} peers, "
                f"{len(self.table.candidates())} usable{hint}"
            )
        if quorum > len(plan):
            raise NoDecisionError(
                f"quorum {quorum} cannot be met: only {len(plan)} ballot(s) can be asked "
                f"({', '.join(sorted(plan))})"
            )
        try:
            request = build_request(
                swarm=self.swarm,
                family=self.family,
                requester_id=self.identity.peer_id,
                tensor=tensor,
                shape=self.input_shape,
                k=k,
                deadline_ms=budget_ms,
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
                num_classes=self.manifest.num_classes,
                early_exit=policy.early_exit,
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
            if (
                record.family != self.family
                or record.model_sha256 != spec.sha256
                or not self.trust.allows(record.public_key)
            ):
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
        old = self._stats.pop(peer_id, None)
        if censored and old is not None and ms <= old:
            new = old
        else:
            new = ms if old is None else old + LATENCY_ALPHA * (ms - old)
        self._stats[peer_id] = new
        while len(self._stats) > config.MAX_PEERS:
            self._stats.popitem(last=False)

    # --- asking ---

    def _started(self) -> None:
        if self._closed:
            raise ConfigError("the requester is closed")
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_suspected(), name="vswarm-probe"
            )

    async def _probe_suspected(self) -> None:
        """Bring suspected peers back once they answer again.

        A suspected peer is never chosen, so no call would ever learn that it recovered
        (after a partition heals, say, a peer does not re-announce). Every
        ``probe_interval_s`` it is probed through the transport.
        """
        while True:
            await asyncio.sleep(self.timings.probe_interval_s)
            for record in self.table.suspected()[:_MAX_PROBES]:
                if await self.transport.healthy(record):
                    self.table.report_success(record.peer_id)

    def ask_peer(self, record: PeerRecord, request: InferRequest) -> asyncio.Future[Answer]:
        """One peer's decoded reply, or a SwarmError, as a future; the caller bounds the
        time, and cancels the future when it gives up. Coalesced, an ask is a plain
        future, no task of its own, queued for the peer (``_flush``): it goes at once
        when no exchange with that peer is out. The exchange runs in a task nothing but
        ``aclose`` cancels; a cancelled ask is skipped, or its answer dropped."""
        local = self.local
        if local is not None and self._is_local(record, local.spec):
            return self._task(self._ask_local(local, request), "vswarm-local")
        waiting = _Waiting(request, asyncio.get_running_loop().create_future())
        if not self.coalesce:
            self._task(self._exchange(record, [waiting]), "vswarm-ask")
            return waiting.future
        queue = self._queues.setdefault(record.peer_id, _Queue())
        queue.waiting.append(waiting)
        self._flush(queue, record)  # a free peer, or a full group, opens an exchange now
        return waiting.future

    def _task(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """``work`` as a task of this requester's: ``aclose`` cancels what is still out."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _ask_local(self, local: LocalInfer, request: InferRequest) -> Answer:
        try:
            return Answer(await local(request, self.identity.peer_id))
        except SwarmError:
            raise
        except Exception as exc:  # a bug there must cost one reply, not the call
            log.exception("local_infer_crashed")
            raise InferenceError(f"the local model failed: {exc!r}") from exc

    def _may_open(self, queue: _Queue, waiting: int) -> bool:
        """Whether an exchange for ``waiting`` asks may open with the peer now: the first
        at once; a further one, up to ``config.REQUESTER_EXCHANGES_PER_PEER``, only for a
        full group, when the peer is so busy that batches cannot grow and keeping its
        model fed during the round trip is the gain left."""
        if not queue.busy:
            return True
        return (
            queue.busy < config.REQUESTER_EXCHANGES_PER_PEER and waiting >= config.MAX_BATCH_ITEMS
        )

    def _flush(self, queue: _Queue, record: PeerRecord) -> None:
        """Send what waits for ``record``'s peer, as groups, while exchanges may open."""
        while queue.waiting and self._may_open(queue, len(queue.waiting)):
            group: list[_Waiting] = []
            while queue.waiting and len(group) < config.MAX_BATCH_ITEMS:
                waiting = queue.waiting.popleft()
                if not waiting.future.done():
                    group.append(waiting)
            if not group:
                break
            queue.busy += 1
            self._task(self._send_group(queue, record, group), "vswarm-batch")
        if not queue.busy and not queue.waiting:
            self._queues.pop(record.peer_id, None)

    async def _send_group(self, queue: _Queue, record: PeerRecord, group: list[_Waiting]) -> None:
        try:
            await self._exchange(record, group)
        finally:
            queue.busy -= 1
            self._flush(queue, record)

    async def _exchange(self, record: PeerRecord, group: list[_Waiting]) -> None:
        """Ask ``group`` of ``record``'s peer as one exchange; settle each ask's future."""
        limit_s = max(w.request.deadline_ms for w in group) / 1000
        answers: list[Answer | SwarmError]
        try:
            async with asyncio.timeout(limit_s):
                link = await self.transport.link(record)
                batch = await link.exchange([w.request for w in group])
        except TimeoutError:
            answers = [PeerTimeoutError(f"{record.peer_id} did not answer in {limit_s:g} s")]
            answers *= len(group)
        except asyncio.CancelledError:  # the requester is closing: its callers learn so now
            for waiting in group:
                if not waiting.future.done():
                    waiting.future.set_exception(PeerUnreachableError("the requester closed"))
            raise
        except SwarmError as exc:
            answers = [exc] * len(group)
        except Exception as exc:  # a bug here must fail these asks, not hang them
            log.exception("exchange_crashed", peer=record.peer_id)
            answers = [InferenceError(f"the exchange with {record.peer_id} failed: {exc!r}")]
            answers *= len(group)
        else:
            check = BatchCheck(batch, record)
            answers = [
                Answer(item, check)
                if isinstance(item, InferReply)
                else PeerUnreachableError(f"ask refused: {item.error}: {item.message}")
                for item in batch.items
            ]
        for waiting, answer in zip(group, answers, strict=True):
            if waiting.future.done():
                continue
            if isinstance(answer, Answer):
                waiting.future.set_result(answer)
            else:
                waiting.future.set_exception(_copy_error(answer))

    def _is_local(self, record: PeerRecord, spec: ModelSpec) -> bool:
        return record.peer_id == self.identity.peer_id and (
            record.variant,
            record.model_sha256,
        ) == (spec.name, spec.sha256)

    # --- deciding ---

    def _sample_signatures(self, call: FanOut) -> None:
        """Check, after the answer, the signatures of a sample of the replies that only
        their link vouched for: a peer that signs garbage is found out and loses
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
                # Its link proved this peer sent it: provably its own bad reply.
                self.reputation.record(record.peer_id, agreed=False)
                if self.metrics is not None:
                    self.metrics.observe_rejection(exc.reason)
                log.warning("late_bad_signature", peer=record.peer_id, request=reply.request_id)

    def _decide(self, call: FanOut, early: bool, budget_ms: int, started: float) -> ClassifyResult:
        _check_quorum(call, budget_ms)
        decision = voting.decide(call.ballots, call.rule, num_classes=call.num_classes)
        # A dissenting reply only its link vouched for has its signature checked now;
        # one that fails is dropped, and the vote taken again without it.
        while call.confirm_dissent(decision.label):
            _check_quorum(call, budget_ms)
            decision = voting.decide(call.ballots, call.rule, num_classes=call.num_classes)
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
