"""The fan-out of one request: ask, hedge, verify, and stop as soon as it can.

The requester (``swarm.requester.requester``) plans which replicas of which variants to ask and
decides from what this gathers. Here, for one call:

- The request goes to the best replica of every variant at once, each ask bounded by
  the call's deadline.
- A variant still unanswered after ``Timings.hedge_after_s`` is hedged with its next
  replica (Dean & Barroso, "The Tail at Scale": hedge after about the p95 latency). A
  variant whose asks all failed moves on to its next replica at once. The first valid
  reply of a variant counts; its siblings still out are cancelled.
- Every reply is checked against the request and the peer asked (``verify.verify_reply``);
  the signature of its batch for dissenters and a sample (``confirm_dissent``).
- Early exit: once ``quorum`` ballots count and ``voting.can_change`` says the variants
  still out cannot change the label, whatever they answer, the rest are cancelled. At
  the deadline, what is still out is cancelled and the call decides with what is in.
- Waves (``wave``, optional): only ``wave`` slots are asked at once; the rest are held
  in reserve and asked only if the first wave's answers leave the label open: when
  nothing of the wave is still out, when one of its slots ran out of replicas, or at
  the hedge delay. A call that stops after the first wave has the label it would have
  had asking everyone, since ``can_change`` counts every slot held back as a ballot
  with any content; the peers held back are simply never disturbed. The price is a
  second round trip for the inputs the first wave leaves open. Since which slots go
  first cannot change a label, they are the cheapest per unit of trust
  (``first_wave_key``: the model's latency in the manifest over the largest weight
  the slot's ballot may carry): the swarm spends the least compute on the inputs the
  first wave settles, the peers of a swarm of devices asked on every call are those
  whose model costs least, and a peer with a poor reputation still goes last, since
  its weight is small. By default (``Policy.wave`` "auto") the requester asks in waves
  of a majority only while it is busy (``config.WAVE_IN_FLIGHT`` calls in flight), when
  capacity counts for more.

Every peer asked ends up in exactly one list:

- ``replies``: its valid reply was counted;
- ``rejected``: it answered and the reply was refused (a ``verify.REJECT_REASONS`` token,
  or ``"malformed"`` when the body did not decode);
- ``missing``: no answer: unreachable, refused, or still out at the deadline;
- ``skipped``: cancelled because no longer needed: the decision could no longer change
  (early exit), or another replica of its variant answered first (a hedge).

What a peer's conduct costs it: a transport failure, a timeout or a reply that is not
provably its own (unsigned, malformed, wrongly signed) backs it off in the peer table;
a reply rejected for a reason it signed (``verify.ATTRIBUTABLE_REPLY_REASONS``) counts as
a disagreement in its reputation.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

from swarm import config
from swarm.config import Timings
from swarm.crypto.identity import TrustStore
from swarm.decision import voting
from swarm.decision.reputation import ReputationBook
from swarm.decision.voting import Ballot
from swarm.discovery.table import PeerRecord, PeerTable
from swarm.errors import (
    DecodeError,
    InferenceError,
    SwarmError,
    TransportError,
    VerificationError,
)
from swarm.inference.manifest import ModelSpec
from swarm.log import get_logger
from swarm.metrics import Metrics
from swarm.wire import verify
from swarm.wire.messages import InferReply, InferRequest, ReplyBatch, unix_ms

log = get_logger(__name__)

# Rejection reason of a reply body that does not decode (the server's token too).
MALFORMED: Final = "malformed"
_DETAIL_CHARS: Final = 200  # peer-supplied text quoted in a log line is cut to this
# A peer cut off by early exit is a straggler (and backed off) when it was still silent
# after the hedge delay and after this many times the median round trip of the replies
# the call counted. Under load every reply is slow; one a little slower than the rest is
# ranked lower by its latency estimate, not taken out of the swarm.
STRAGGLER_RATIO: Final = 2.0


@dataclasses.dataclass(frozen=True, slots=True)
class ReplyInfo:
    """A valid reply that was counted."""

    peer: str
    variant: str
    topk: tuple[tuple[int, float], ...]  # (class, probability), most probable first
    latency_ms: float  # round trip as this requester measured it
    weight: float  # the ballot's weight in the vote


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """What one ask brought back: a decoded reply, not yet checked against the request,
    and the check of the signature that covers it (None: the requester's own model's)."""

    reply: InferReply
    batch: BatchCheck | None = None


class BatchCheck:
    """The signature check of one reply batch, made at most once for all its items."""

    __slots__ = ("_failure", "_sampled", "_verified", "batch", "record")

    def __init__(self, batch: ReplyBatch, record: PeerRecord) -> None:
        self.batch = batch
        self.record = record
        self._verified = False
        self._failure: VerificationError | None = None
        self._sampled: bool | None = None

    def sampled(self, draw: Callable[[], bool]) -> bool:
        """Whether this batch is in the sample of late signature checks: ``draw`` is
        asked once, by its first item, and every item of the batch gets that answer.
        Its one signature covers them all, so they are checked together or not at all,
        and the share of replies checked is the rate ``draw`` samples at."""
        if self._sampled is None:
            self._sampled = draw()
        return self._sampled

    def check(self) -> None:
        """Raise ``VerificationError`` unless the peer's key signed the batch."""
        if not self._verified and self._failure is None:
            try:
                verify.verify_reply_batch(self.batch, expected_key=self.record.public_key)
                self._verified = True
            except VerificationError as exc:
                self._failure = exc
        if self._failure is not None:
            raise VerificationError(self._failure.reason, self._failure.detail)


@dataclasses.dataclass(frozen=True, slots=True)
class Unchecked:
    """A counted reply whose signature is not checked yet (its link proved the sender)."""

    record: PeerRecord
    reply: InferReply
    batch: BatchCheck  # the batch whose one signature covers it

    def sampled(self, draw: Callable[[], bool]) -> bool:
        """Whether this reply is in the sample of late signature checks (its batch's draw)."""
        return self.batch.sampled(draw)

    def check(self) -> None:
        """Raise ``VerificationError`` unless the peer's key signed the reply."""
        self.batch.check()


@dataclasses.dataclass(frozen=True, slots=True)
class Rejection:
    """A reply that arrived and was refused."""

    peer: str
    reason: str
    detail: str = ""


@dataclasses.dataclass(slots=True)
class Replicas:
    """One variant of a call: the replicas not asked yet, best first, and those out."""

    spec: ModelSpec
    queue: collections.deque[PeerRecord]
    weight_bound: float  # the largest weight a ballot of this variant can carry
    inflight: dict[str, asyncio.Future[Answer]] = dataclasses.field(default_factory=dict)
    done: bool = False


def first_wave_key(slot: Replicas) -> tuple[float, float]:
    """A slot's rank for the first wave, lowest first: its model's latency (the
    manifest's) per unit of the weight its ballot may carry, then the heavier ballot.
    A slot whose ballots weigh nothing goes last."""
    if not slot.weight_bound > 0:
        return (math.inf, 0.0)
    return (slot.spec.latency_ms / slot.weight_bound, -slot.weight_bound)


class Asker(Protocol):
    """What a fan-out needs of its requester (``requester.Requester`` is one)."""

    @property
    def table(self) -> PeerTable: ...
    @property
    def trust(self) -> TrustStore: ...
    @property
    def reputation(self) -> ReputationBook: ...
    @property
    def timings(self) -> Timings: ...
    @property
    def metrics(self) -> Metrics | None: ...

    def ask_peer(self, record: PeerRecord, request: InferRequest) -> asyncio.Future[Answer]:
        """Ask ``record``'s peer: its decoded reply, or a ``SwarmError``, as a future
        the fan-out may cancel. It ends on its own only by an answer or a failure: the
        fan-out bounds the time."""
        ...

    def observe_latency(self, peer_id: str, ms: float, *, censored: bool = False) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class _Outcome:
    record: PeerRecord
    seconds: float
    answer: Answer | None
    error: SwarmError | None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class FanOut:
    """One request on its way to the swarm, and what came back."""

    def __init__(
        self,
        owner: Asker,
        request: InferRequest,
        *,
        plan: dict[str, Replicas],
        weights: Mapping[str, float],
        rule: str,
        quorum: int,
        deadline_at: float,
        wave: int | None = None,
        rank: Callable[[Replicas], Any] = first_wave_key,
        num_classes: int = config.NUM_CLASSES,
        early_exit: bool = True,
    ) -> None:
        if wave is not None and wave < 1:
            raise ValueError(f"wave must be >= 1 or None (every slot at once), got {wave}")
        self.owner = owner
        self.request = request
        self.variants = plan  # slot key -> Replicas (one ballot each; see Policy.replicas)
        # Which slot asked each peer: a variant's replicas may be split across slots.
        self._slot_of = {r.peer_id: v for v in plan.values() for r in v.queue}
        self.weights = weights
        self.rule = rule
        self.num_classes = num_classes  # the family's
        self.early_exit = early_exit
        self.quorum = quorum
        self.deadline_at = deadline_at  # time.monotonic(), as the event loop's clock
        # What the asks brought back, not absorbed yet, and the wait for the next one.
        self._outcomes: collections.deque[_Outcome] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.ballots: list[Ballot] = []
        self.replies: list[ReplyInfo] = []
        self.rejected: list[Rejection] = []
        self.missing: list[str] = []
        self.skipped: list[str] = []
        # Counted replies whose signatures are not checked yet (their link proved the sender).
        self.unchecked: dict[str, Unchecked] = {}
        self.asked = 0
        self._asked_at: dict[str, float] = {}  # peer id -> time.monotonic() when asked
        self._stopping = False
        # Slots held back from the first wave, best first (see the module's "Waves").
        self.reserve: list[Replicas] = []
        self.wave = wave if wave is not None and wave < len(plan) else None
        if self.wave is not None:
            ranked = sorted(plan.values(), key=rank)
            self.reserve = ranked[self.wave :]

    async def run(self) -> bool:
        """Ask, hedge and gather until decided, exhausted or the deadline; True if early."""
        loop = asyncio.get_running_loop()
        # Both clocks are monotonic; the loop's is the one timeouts use.
        offset = loop.time() - time.monotonic()
        deadline = self.deadline_at + offset
        hedge_at = loop.time() + self.owner.timings.hedge_after_s
        hedged = early = False
        try:
            held = {id(v) for v in self.reserve}
            for variant in self.variants.values():
                if id(variant) not in held:
                    self._ask_next(variant)
            while any(v.inflight for v in self.variants.values()) or self.reserve:
                if self.early_exit and self._settled():
                    early = True
                    break
                if loop.time() >= deadline:
                    break
                if self.reserve and not any(v.inflight for v in self.variants.values()):
                    self._release()  # the first wave is in and left the label open
                    continue
                if not await self._wait(loop, deadline if hedged else min(hedge_at, deadline)):
                    if not hedged and loop.time() >= hedge_at:
                        hedged = True
                        self._release()
                        self._hedge()
                    continue
                # Every answer in (a reply batch brings several at once) is absorbed
                # before the next check: one check for all.
                while self._outcomes:
                    self._absorb(self._outcomes.popleft())
            self._stopping = True
            while self._outcomes:  # answers that are in count
                self._absorb(self._outcomes.popleft())
            self._stop(early=early)
        finally:
            self._stopping = True
            for variant in self.variants.values():
                for ask in variant.inflight.values():
                    ask.cancel()
        return early

    async def _wait(self, loop: asyncio.AbstractEventLoop, until: float) -> bool:
        """Wait until an answer is in or the loop's clock reaches ``until``; True if one
        is in. One future and one timer: no task, no timeout scope."""
        if self._outcomes:
            return True
        waiter = self._waiter = loop.create_future()
        timer = loop.call_at(until, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return bool(self._outcomes)

    def _ask_next(self, variant: Replicas) -> None:
        if self._stopping or variant.done or not variant.queue:
            return
        record = variant.queue.popleft()
        started = time.monotonic()
        ask = self.owner.ask_peer(record, self.request)
        variant.inflight[record.peer_id] = ask
        self._asked_at[record.peer_id] = started
        self.asked += 1
        ask.add_done_callback(functools.partial(self._answered, record, started))

    def _release(self) -> None:
        """Ask the slots held in reserve: the first wave cannot settle the call alone."""
        reserve, self.reserve = self.reserve, []
        for variant in reserve:
            self._ask_next(variant)

    def _hedge(self) -> None:
        for name, variant in self.variants.items():
            if not variant.done and variant.inflight and variant.queue:
                log.info("hedge_sent", variant=name, peer=variant.queue[0].peer_id)
                self._ask_next(variant)

    def _answered(self, record: PeerRecord, started: float, ask: asyncio.Future[Answer]) -> None:
        """An ask ended: queue what it brought for ``run``; nothing if it was cancelled
        (the fan-out did that, and listed the peer as skipped or missing then)."""
        if ask.cancelled():
            return
        seconds = time.monotonic() - started
        error = ask.exception()
        if error is None:
            outcome = _Outcome(record, seconds, ask.result(), None)
        elif isinstance(error, SwarmError):
            outcome = _Outcome(record, seconds, None, error)
        else:  # a bug in the asking must cost this one reply, not the call
            log.error("ask_crashed", peer=record.peer_id, exc_info=error)
            outcome = _Outcome(record, seconds, None, InferenceError(f"the ask failed: {error!r}"))
        self._outcomes.append(outcome)
        if self._waiter is not None:
            _wake(self._waiter)

    def _absorb(self, outcome: _Outcome) -> None:
        record = outcome.record
        variant = self._slot_of[record.peer_id]
        if variant.inflight.pop(record.peer_id, None) is None:
            return  # cancelled meanwhile, and already listed as skipped or missing
        if isinstance(outcome.error, DecodeError):
            self._reject(record, MALFORMED, str(outcome.error))
        elif isinstance(outcome.error, VerificationError):
            self._reject(record, outcome.error.reason, outcome.error.detail)
        elif outcome.error is not None:
            self._fail(record, outcome.error, outcome.seconds)
        elif outcome.answer is not None:
            self._check(variant, record, outcome.answer, outcome.seconds)
        if not variant.done and not variant.inflight:
            self._ask_next(variant)  # fail over at once rather than wait for the hedge
            if not variant.inflight:  # no replica left: its ballot is lost to the wave
                self._release()

    def _check(self, variant: Replicas, record: PeerRecord, answer: Answer, seconds: float) -> None:
        owner = self.owner
        reply = answer.reply
        try:
            verify.verify_reply(
                reply,
                request=self.request,
                expected_peer_id=record.peer_id,
                expected_key=record.public_key,
                trust=owner.trust,
                now_ms=unix_ms(),
                freshness_s=owner.timings.freshness_s,
                expected_variant=record.variant,
                expected_model_sha256=record.model_sha256,
                num_classes=self.num_classes,
            )
        except VerificationError as exc:
            self._reject(record, exc.reason, exc.detail)
            return
        owner.table.report_success(record.peer_id)
        owner.observe_latency(record.peer_id, seconds * 1000)
        variant.done = True
        weight = variant.spec.val_accuracy * self.weights.get(record.peer_id, 1.0)
        topk = reply.topk_probabilities()
        self.ballots.append(Ballot(record.peer_id, record.variant, topk, weight))
        self.replies.append(ReplyInfo(record.peer_id, record.variant, topk, seconds * 1000, weight))
        if answer.batch is not None:
            self.unchecked[record.peer_id] = Unchecked(record, reply, answer.batch)
        self._cancel(variant, skipped=True)

    def confirm_dissent(self, label: int) -> bool:
        """Check the signature of every counted reply that dissents from ``label`` and
        that only its link vouched for; drop the ballots whose signature fails.
        True if one was dropped (the vote must be taken again)."""
        dropped = False
        for peer_id, unchecked in list(self.unchecked.items()):
            if voting.top_class(unchecked.reply.topk_probabilities()) == label:
                continue
            del self.unchecked[peer_id]
            record = unchecked.record
            try:
                unchecked.check()
            except VerificationError as exc:
                self.ballots = [b for b in self.ballots if b.peer_id != peer_id]
                self.replies = [r for r in self.replies if r.peer != peer_id]
                # Its link proved the sender: the peer itself sent this badly signed reply.
                self._reject(record, exc.reason, exc.detail, attributable=True)
                dropped = True
        return dropped

    def _reject(
        self, record: PeerRecord, reason: str, detail: str, *, attributable: bool = False
    ) -> None:
        owner = self.owner
        self.rejected.append(Rejection(record.peer_id, reason, detail))
        if owner.metrics is not None:
            owner.metrics.observe_rejection(reason)
        log.warning(
            "reply_rejected", peer=record.peer_id, reason=reason, detail=detail[:_DETAIL_CHARS]
        )
        if attributable or reason in verify.ATTRIBUTABLE_REPLY_REASONS:
            owner.reputation.record(record.peer_id, agreed=False)
        else:
            # Unsigned or not signed by the peer: that address does not give us its answers.
            owner.table.report_failure(record.peer_id, now=time.monotonic())

    def _fail(self, record: PeerRecord, error: SwarmError, seconds: float) -> None:
        self.missing.append(record.peer_id)
        log.info("peer_call_failed", peer=record.peer_id, error=str(error)[:_DETAIL_CHARS])
        self.owner.observe_latency(record.peer_id, seconds * 1000, censored=True)
        if isinstance(error, TransportError | InferenceError):
            self.owner.table.report_failure(record.peer_id, now=time.monotonic())

    def _settled(self) -> bool:
        """Whether the replies still out can no longer change the decision."""
        if sum(1 for b in self.ballots if b.weight > 0) < self.quorum:
            return False
        # Replies of excluded peers weigh 0 and are never counted: they cannot change it.
        out = [
            v
            for v in self.variants.values()
            if not v.done and (v.inflight or v.queue) and v.weight_bound > 0
        ]
        if not out:
            return True
        return not voting.can_change(
            self.ballots,
            missing=len(out),
            rule=self.rule,
            missing_weight=max(v.weight_bound for v in out),
            num_classes=self.num_classes,
        )

    def _stop(self, *, early: bool) -> None:
        """Cancel what is still out: skipped after an early exit, missing at the deadline."""
        for variant in self.variants.values():
            self._cancel(variant, skipped=early)
        if early:
            log.debug("classify_early_exit", skipped=len(self.skipped))

    def _cancel(self, variant: Replicas, *, skipped: bool) -> None:
        now = time.monotonic()
        straggler_s = self.owner.timings.hedge_after_s
        if skipped and self.replies:
            counted = sorted(r.latency_ms for r in self.replies)
            straggler_s = max(straggler_s, STRAGGLER_RATIO * counted[len(counted) // 2] / 1000)
        for peer_id, task in variant.inflight.items():
            task.cancel()
            # Cut off, its round trip is at least this long: a slow replica loses rank.
            self.owner.observe_latency(
                peer_id, (now - self._asked_at[peer_id]) * 1000, censored=True
            )
            if skipped:
                self.skipped.append(peer_id)
                # Still silent after the hedge delay, and well after the replies counted,
                # while the call was decided without it: a straggler. Backing it off
                # keeps it from holding later calls.
                if now - self._asked_at[peer_id] >= straggler_s:
                    self.owner.table.report_failure(peer_id, now=now)
            else:
                self.missing.append(peer_id)
                log.info("peer_call_timed_out", peer=peer_id)
                self.owner.table.report_failure(peer_id, now=now)
        variant.inflight.clear()

    def summary(self) -> str:
        """What became of the peers asked, for an error message."""
        reasons = collections.Counter(r.reason for r in self.rejected)
        parts = [f"{len(self.replies)} valid"]
        if self.rejected:
            detail = ", ".join(f"{reason} x{n}" for reason, n in sorted(reasons.items()))
            parts.append(f"{len(self.rejected)} rejected ({detail})")
        parts.append(f"{len(self.missing)} missing (unreachable or timed out)")
        excluded = sum(1 for b in self.ballots if b.weight == 0)
        if excluded:
            parts.append(f"{excluded} from peers excluded by reputation")
        return ", ".join(parts)
