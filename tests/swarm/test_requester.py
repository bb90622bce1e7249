"""Tests of swarm.requester (requester and fanout) against fake peers on the memory transport.

Each fake peer (``tests.swarm.fakepeers``) is an ``Answerer`` on a ``MemoryNetwork``: the
requester reaches it through the same handshake, sealing and codec as over a WebSocket,
and no socket is opened. A peer answers, signs or misbehaves as told. Timings are shrunk
rather than slept through; a peer that "hangs" waits on an event the test controls.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
from collections.abc import AsyncIterator, Sequence

import pytest
from structlog.testing import capture_logs

import swarm.requester.requester as requester_module
from swarm import config
from swarm.crypto.identity import Identity, TrustStore
from swarm.decision.reputation import PRIOR_SCORE
from swarm.discovery.table import PeerRecord
from swarm.errors import ConfigError, NoDecisionError
from swarm.inference.engine import InferenceResult
from swarm.inference.manifest import ModelSpec
from swarm.link import memory
from swarm.link.memory import MemoryPipe
from swarm.requester.call import ClassifyResult, Policy
from swarm.requester.fanout import Answer, Replicas, first_wave_key
from swarm.requester.requester import LocalInfer, Requester
from swarm.wire.messages import Ask, InferRequest, ItemError, ReplyBatch, build_request
from tests.swarm.fakepeers import (
    SWARM,
    TENSOR,
    TIMINGS,
    Behaviour,
    FakePeer,
    Reply,
    Rig,
    announce,
    flipped,
    hangs,
    malformed,
    manifest_of,
    other_request,
    probs,
    reply_for,
    says,
    slow,
    spec,
    stale,
    stranger,
    transport_of,
    unavailable,
    wrong_variant,
    zeroed,
)

ALL_AT_ONCE = Policy(wave=None)  # every ballot asked at once, however busy the requester


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


def failures(rig: Rig, peer: FakePeer) -> int:
    record = rig.table.get(peer.peer_id)
    assert record is not None
    return record.failures


async def classify(requester: Requester, **kw: object) -> ClassifyResult:
    # Every test is bounded: a call that overruns its deadline fails instead of hanging.
    async with asyncio.timeout(10):
        return await requester.classify(TENSOR, **kw)  # type: ignore[arg-type]


async def concurrent_calls(
    requester: Requester, n: int, quorum: int = 3, **kw: object
) -> list[ClassifyResult]:
    async with asyncio.timeout(10):
        return await asyncio.gather(
            *(requester.classify(TENSOR, quorum=quorum, **kw) for _ in range(n))  # type: ignore[arg-type]
        )


# --- the happy path ----------------------------------------------------------------------


async def test_happy_path_decides_with_every_variant(rig: Rig) -> None:
    """Three honest peers: the label they share, every reply listed, a certificate."""
    peers = [rig.peer(v, says({3: 0.8, 1: 0.1})) for v in ("V1", "V2", "V3")]
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
    # One request for the whole call: every peer got the same id, k and input.
    asks = {p.asks[0] for p in peers}
    assert len(asks) == 1
    (ask,) = asks
    assert (ask.request_id, ask.k) == (result.request_id, config.DEFAULT_TOP_K)


async def test_to_json_has_the_documented_shape(rig: Rig) -> None:
    """to_json carries exactly the documented keys and survives json.dumps."""
    rig.peer("V1", says({3: 0.8}))
    refusing = rig.peer("V2", unavailable)
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
    assert doc["missing"] == [refusing.peer_id]


# --- verification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "reason", "attributable"),
    [
        # A bad signature is checked for a dissenting reply before the answer; its link
        # proved the peer sent it, so it is evidence against that peer.
        pytest.param(
            {"behaviour": says({7: 0.9}), "signer": flipped},
            "bad_signature",
            True,
            id="bad_signature",
        ),
        pytest.param(
            {"behaviour": says({7: 0.9}), "signer": stranger}, "bad_signature", True, id="other_key"
        ),
        # Someone else answers the peer's link, under its own name and key: the handshake
        # fails, and the peer's name is not blamed for it.
        pytest.param(
            {"behaviour": says({7: 1.0}), "impostor": True}, "wrong_key", False, id="impostor"
        ),
        pytest.param({"behaviour": stale}, "stale", True, id="stale"),
        pytest.param({"behaviour": other_request}, "wrong_binding", True, id="other_request"),
        pytest.param({"behaviour": wrong_variant}, "wrong_variant", True, id="wrong_variant"),
        pytest.param({"behaviour": malformed}, "malformed", False, id="malformed"),
    ],
)
async def test_bad_reply_is_rejected_and_not_counted(
    rig: Rig, setup: dict[str, object], reason: str, attributable: bool
) -> None:
    """A bad reply is kept with its reason, left out of the vote, and costs its peer."""
    # Two honest replies this unsure cannot decide alone: the third is always awaited.
    rig.peer("V1", says({3: 0.5, 1: 0.3}))
    rig.peer("V2", says({3: 0.5, 1: 0.3}))
    bad = rig.peer("V3", **setup)  # type: ignore[arg-type]
    result = await classify(rig.requester())
    assert result.label == 3
    assert [(r.peer, r.reason) for r in result.rejected] == [(bad.peer_id, reason)]
    assert bad.peer_id not in {r.peer for r in result.replies}
    assert len(result.replies) == 2
    assert rejections(rig, reason) == 1
    if attributable:  # provably the peer's own: evidence against it
        assert rig.reputation.score(bad.peer_id) < PRIOR_SCORE
        assert failures(rig, bad) == 0
    else:  # not provably its own: the address is backed off, the peer's name is not blamed
        assert bad.peer_id not in rig.reputation
        assert failures(rig, bad) == 1


async def test_an_overloaded_peer_is_missing_not_rejected(rig: Rig) -> None:
    """A peer that answers an ask with an error ("overloaded") gave no reply to judge: it
    is missing and backed off, with no rejection and no reputation cost."""
    rig.peer("V1", says({3: 0.8}))
    busy = rig.peer("V2", unavailable)
    result = await classify(rig.requester(), quorum=1)
    assert result.missing == (busy.peer_id,)
    assert result.rejected == ()
    assert busy.peer_id not in rig.reputation
    assert failures(rig, busy) == 1
    assert len(busy.asks) == 1


async def test_replayed_reply_is_rejected(rig: Rig) -> None:
    """A peer replaying the reply it signed for an earlier request is caught."""
    cache: list[Reply] = []

    async def replays(peer: FakePeer, req: InferRequest) -> Reply:
        if not cache:
            cache.append(reply_for(peer, req, {3: 0.8}))
        return cache[0]

    rig.peer("V1", says({3: 0.8}))
    liar = rig.peer("V2", replays)
    requester = rig.requester()
    first = await classify(requester)
    assert liar.peer_id in {r.peer for r in first.replies}
    second = await classify(requester)
    assert [(r.peer, r.reason) for r in second.rejected] == [(liar.peer_id, "wrong_binding")]


async def test_all_rejected_raises_with_the_reasons(rig: Rig) -> None:
    """Nothing valid: NoDecisionError names the peers asked and why each failed."""
    rig.peer("V1", wrong_variant)
    rig.peer("V2", unavailable)
    with pytest.raises(
        NoDecisionError, match=r"no counted replies from 2 peers within 500 ms"
    ) as e:
        await classify(rig.requester(), deadline_ms=500)
    assert "wrong_variant x1" in str(e.value)
    assert "1 missing" in str(e.value)


# --- signatures --------------------------------------------------------------------------


async def test_dissenting_reply_with_a_bad_signature_is_dropped_against_its_peer(
    rig: Rig,
) -> None:
    """Its link proves the peer sent it; it dissents, so its signature is checked before
    the answer, fails, and the ballot is dropped: evidence against that peer."""
    rig.peer("V1", says({3: 0.5, 1: 0.3}))
    rig.peer("V2", says({3: 0.5, 1: 0.3}))
    liar = rig.peer("V3", says({7: 0.9}), signer=zeroed)
    result = await classify(rig.requester(), quorum=2)
    assert result.label == 3
    assert [(r.peer, r.reason) for r in result.rejected] == [(liar.peer_id, "bad_signature")]
    assert liar.peer_id not in {r.peer for r in result.replies}
    assert len(liar.asks) == 1
    assert rig.reputation.score(liar.peer_id) < PRIOR_SCORE
    assert failures(rig, liar) == 0


async def test_agreeing_reply_with_a_bad_signature_is_found_by_the_sample(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agreeing reply counts on its link; the signature check after the answer (here
    of every reply) finds the bad one and counts it against its peer."""
    monkeypatch.setattr(config, "LATE_SIGNATURE_SAMPLE", 1.0)
    rig.peer("V1", says({3: 0.8}))
    liar = rig.peer("V2", says({3: 0.8}), signer=flipped)
    with capture_logs() as logs:
        result = await classify(rig.requester(), quorum=2)
        assert liar.peer_id in {r.peer for r in result.replies}
        assert liar.peer_id not in rig.reputation
        await asyncio.sleep(0)  # the check runs on the next turn of the loop
    assert [e["peer"] for e in logs if e["event"] == "late_bad_signature"] == [liar.peer_id]
    assert rig.reputation.score(liar.peer_id) < PRIOR_SCORE
    assert rejections(rig, "bad_signature") == 1


async def test_agreeing_reply_outside_the_sample_is_not_checked(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no sample drawn, an agreeing reply is never checked: its link stood for it."""
    monkeypatch.setattr(config, "LATE_SIGNATURE_SAMPLE", 0.0)
    rig.peer("V1", says({3: 0.8}))
    liar = rig.peer("V2", says({3: 0.8}), signer=flipped)
    with capture_logs() as logs:
        result = await classify(rig.requester(), quorum=2)
        await asyncio.sleep(0)  # where a sampled check would run
    assert liar.peer_id in {r.peer for r in result.replies}
    assert not [e for e in logs if e["event"] == "late_bad_signature"]
    assert rejections(rig, "bad_signature") is None


# --- links -------------------------------------------------------------------------------


async def test_a_link_is_opened_once_per_peer_and_kept_across_calls(rig: Rig) -> None:
    """Each peer's link opens on the first ask and carries every later one; concurrent
    first asks share that one opening."""
    peers = [rig.peer(v, says({3: 0.8})) for v in ("V1", "V2", "V3")]
    requester = rig.requester(coalesce=False)  # every ask an exchange of its own
    await concurrent_calls(requester, 4)
    for _ in range(2):
        await classify(requester, quorum=3)
    assert transport_of(requester).opened == {p.peer_id: 1 for p in peers}
    assert [len(p.asks) for p in peers] == [6, 6, 6]


def record_peer_ends(monkeypatch: pytest.MonkeyPatch) -> list[MemoryPipe]:
    """The peer's end of every memory pipe dialled from now on, in order."""
    ends: list[MemoryPipe] = []
    make = memory.pipe_pair

    def recorded() -> tuple[MemoryPipe, MemoryPipe]:
        client, server = make()
        ends.append(server)
        return client, server

    monkeypatch.setattr(memory, "pipe_pair", recorded)
    return ends


async def test_a_link_the_peer_closes_costs_its_reply_and_the_next_call_opens_another(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that closes its link mid-ask (it restarted, say) is missing at once, not at
    the deadline; once its back-off has passed, the next call opens a new link to it."""
    peer_ends = record_peer_ends(monkeypatch)
    flaky = rig.peer("V1", hangs({3: 0.9}))
    requester = rig.requester()
    call = asyncio.create_task(requester.classify(TENSOR, deadline_ms=30_000))
    async with asyncio.timeout(3):  # far below the call's deadline
        await flaky.received.wait()
        (end,) = peer_ends
        await end.close("the peer restarted")
        with pytest.raises(NoDecisionError, match="1 missing"):
            await call
    assert failures(rig, flaky) == 1
    rig.clock.skip(TIMINGS.backoff_base_s)
    flaky.release.set()
    result = await classify(requester)
    assert [r.peer for r in result.replies] == [flaky.peer_id]
    assert transport_of(requester).opened == {flaky.peer_id: 2}
    assert len(peer_ends) == 2


async def test_a_malformed_answer_ends_the_link_and_the_next_call_opens_another(
    rig: Rig,
) -> None:
    """An answer that does not decode ends its link: that reply is rejected as malformed,
    and the next call to the peer goes over a new link."""
    peer = rig.peer("V1", malformed)
    requester = rig.requester()
    with capture_logs() as logs, pytest.raises(NoDecisionError, match="malformed x1"):
        await classify(requester)
    assert [e["peer"] for e in logs if e["event"] == "link_broken"] == [peer.peer_id]
    rig.clock.skip(TIMINGS.backoff_base_s)
    peer.behaviour = says({3: 0.9})
    result = await classify(requester)
    assert [r.peer for r in result.replies] == [peer.peer_id]
    assert transport_of(requester).opened == {peer.peer_id: 2}


async def test_a_peer_whose_answer_crashes_costs_only_that_reply(rig: Rig) -> None:
    """A bug in a peer's answering (its answerer raises) costs that peer's reply, not the
    call: it is missing at once, and its next ask is answered."""
    rig.peer("V1", says({3: 0.9}))

    async def crashes(peer: FakePeer, req: InferRequest) -> Reply:
        peer.behaviour = says({3: 0.9})  # once
        raise RuntimeError("a bug in the peer")

    buggy = rig.peer("V2", crashes)
    requester = rig.requester()
    async with asyncio.timeout(3):
        result = await requester.classify(TENSOR, deadline_ms=600)
    assert result.missing == (buggy.peer_id,)
    assert result.latency_ms < 300  # not held until the deadline
    rig.clock.skip(TIMINGS.backoff_base_s)
    second = await classify(requester)
    assert buggy.peer_id in {r.peer for r in second.replies}


# --- Byzantine peers ---------------------------------------------------------------------


async def test_colluding_liars_do_not_flip_robust(rig7: Rig) -> None:
    """Two of seven peers naming class 7 with 1.0 flip `sum` but not `robust`."""
    for v in ("V1", "V2", "V3", "V4", "V5"):
        rig7.peer(v, says({3: 0.35, 1: 0.3}))
    for v in ("V6", "V7"):
        rig7.peer(v, says({7: 1.0}))
    requester = rig7.requester()
    robust = await classify(requester, rule="robust", quorum=7)  # the liars' votes are in
    assert robust.label == 3
    assert len(robust.replies) == 7
    summed = await classify(requester, rule="sum", quorum=7)
    assert summed.label == 7  # the contrast: the paper's rule is flipped


# --- deadlines, failures, hedging, early exit --------------------------------------------


async def test_hung_peer_is_missing_at_the_deadline(rig: Rig) -> None:
    """A peer that never answers: the call decides at its deadline and reports it missing."""
    rig.peer("V1", says({3: 0.6}))
    rig.peer("V2", says({5: 0.6}))  # a split vote: the hung peer's reply would matter
    hung = rig.peer("V3", hangs({3: 0.6}))
    result = await classify(rig.requester(), deadline_ms=300)
    assert result.missing == (hung.peer_id,)
    assert result.skipped == ()
    assert len(result.replies) == 2
    assert 300 <= result.latency_ms < 2000
    assert failures(rig, hung) == 1  # backed off for the next call


async def test_unreachable_peer_is_missing_and_backed_off(rig: Rig) -> None:
    """A peer no link reaches is reported missing, not fatal."""
    rig.peer("V1", says({3: 0.8}))
    dead = rig.peer("V2", says({3: 0.8}), reachable=False)
    requester = rig.requester()
    result = await classify(requester)
    assert result.missing == (dead.peer_id,)
    assert failures(rig, dead) == 1
    assert dead.asks == []
    assert dead.peer_id not in transport_of(requester).opened


async def test_hedge_goes_to_a_second_replica(rig: Rig) -> None:
    """A replica that does not answer within hedge_after_s is hedged with the next one."""
    first, second = sorted((Identity.generate(), Identity.generate()), key=lambda i: i.peer_id)
    slow_peer = rig.peer("V1", hangs({3: 0.8}), identity=first)  # ranked first: lower id
    fast = rig.peer("V1", says({3: 0.8}), identity=second)
    requester = rig.requester(timings=dataclasses.replace(TIMINGS, hedge_after_s=0.05))
    with capture_logs() as logs:
        result = await classify(requester)
    assert [r.peer for r in result.replies] == [fast.peer_id]
    assert result.skipped == (slow_peer.peer_id,)  # cancelled once its sibling answered
    assert result.missing == ()
    assert len(slow_peer.asks) == len(fast.asks) == 1
    assert slow_peer.asks == fast.asks  # the same request
    assert any(e["event"] == "hedge_sent" and e["peer"] == fast.peer_id for e in logs)
    # The cut-off replica now ranks behind the one that answered.
    slow_ms, fast_ms = requester.latency_ms(slow_peer.peer_id), requester.latency_ms(fast.peer_id)
    assert slow_ms is not None
    assert fast_ms is not None
    assert slow_ms > fast_ms


async def test_no_hedge_when_the_first_replica_answers(rig: Rig) -> None:
    """A variant answered in time asks exactly one of its replicas."""
    a = rig.peer("V1", says({3: 0.8}))
    b = rig.peer("V1", says({3: 0.8}))
    result = await classify(rig.requester())
    assert len(result.replies) == 1
    assert len(a.asks) + len(b.asks) == 1


async def test_failed_replica_fails_over_at_once(rig: Rig) -> None:
    """A replica that refuses the ask is replaced by the next one without waiting."""
    first, second = sorted((Identity.generate(), Identity.generate()), key=lambda i: i.peer_id)
    broken = rig.peer("V1", unavailable, identity=first)
    good = rig.peer("V1", says({3: 0.8}), identity=second)
    result = await classify(rig.requester(), deadline_ms=5000)  # hedge_after_s is 30 s
    assert [r.peer for r in result.replies] == [good.peer_id]
    assert result.missing == (broken.peer_id,)
    assert result.latency_ms < 5000


async def test_early_exit_skips_a_peer_that_cannot_change_the_result(rig: Rig) -> None:
    """Two confident agreeing replies decide; the slow third is cancelled, not awaited."""
    rig.peer("V1", says({3: 0.9}))
    rig.peer("V2", says({3: 0.9}))
    late = rig.peer("V3", hangs({7: 1.0}))
    async with asyncio.timeout(3):  # far below the 30 s deadline given to the call
        result = await rig.requester().classify(TENSOR, deadline_ms=30_000)
    assert result.label == 3
    assert result.skipped == (late.peer_id,)
    assert result.missing == ()
    assert failures(rig, late) == 0  # not its fault: it was not needed


async def test_without_early_exit_every_ballot_is_awaited(rig: Rig) -> None:
    """Policy(early_exit=False) waits for the third reply the vote no longer needs."""
    rig.peer("V1", says({3: 0.9}))
    rig.peer("V2", says({3: 0.9}))
    late = rig.peer("V3", slow(0.2, {3: 0.9}))
    policy = Policy(early_exit=False, wave=None)
    result = await rig.requester().classify(TENSOR, deadline_ms=30_000, policy=policy)
    assert late.peer_id in {r.peer for r in result.replies}
    assert result.skipped == ()


async def test_no_early_exit_before_quorum(rig: Rig) -> None:
    """With quorum 3, two agreeing replies are not enough: the call waits for the third."""
    rig.peer("V1", says({3: 0.9}))
    rig.peer("V2", says({3: 0.9}))
    late = rig.peer("V3", hangs({3: 0.9}))
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
    rig.peer("V1", says({3: 0.9}))
    rig.peer("V2", unavailable)
    with pytest.raises(NoDecisionError, match=r"quorum not met \(1 counted replies, 2 required\)"):
        await classify(rig.requester(), quorum=2, deadline_ms=500)


async def test_quorum_above_the_variants_fails_fast(rig: Rig) -> None:
    """A quorum no set of peers can meet is refused before anything is sent."""
    peer = rig.peer("V1", says({3: 0.9}))
    requester = rig.requester()
    with pytest.raises(NoDecisionError, match="quorum 2 cannot be met"):
        await classify(requester, quorum=2)
    assert peer.asks == []
    assert not transport_of(requester).opened


async def test_no_peers_raises(rig: Rig) -> None:
    """An empty peer table: NoDecisionError at once, saying nobody serves a variant."""
    with pytest.raises(NoDecisionError, match="no peer serves a variant"):
        await classify(rig.requester())


# --- peer choice -------------------------------------------------------------------------


async def test_peers_with_unknown_models_or_keys_are_not_asked(rig: Rig) -> None:
    """Unknown model hash, unknown variant, or a key off the allow-list: never asked."""
    good = rig.peer("V1", says({3: 0.9}))
    wrong_hash = rig.peer("V2", says({7: 1.0}), model_sha256="ab" * 32)
    unknown = rig.peer("V3", says({7: 1.0}), variant="Vzz")
    untrusted = rig.peer("V3", says({7: 1.0}))
    trust = TrustStore.from_keys([good.identity.public_key, unknown.identity.public_key])
    requester = rig.requester(trust=trust)
    assert requester.available_variants() == {"V1"}
    result = await classify(requester)
    assert [r.peer for r in result.replies] == [good.peer_id]
    assert wrong_hash.asks == unknown.asks == untrusted.asks == []


async def test_peers_of_another_family_are_never_asked(rig: Rig) -> None:
    """A peer announcing another family, even with the same model, gets no ask: families
    sharing a swarm name never mix their votes."""
    good = rig.peer("V1", says({3: 0.9}))
    stranger = rig.peer("V2", says({7: 1.0}), family="0b" * 16)
    requester = rig.requester()
    assert requester.available_variants() == {"V1"}
    result = await classify(requester)
    assert [r.peer for r in result.replies] == [good.peer_id]
    assert stranger.asks == []


async def test_a_requester_among_peers_of_another_family_says_so(rig: Rig) -> None:
    """With only another family's peers around, the error names it and the fix."""
    rig.peer("V1", says({3: 0.9}), family="0b" * 16)
    with pytest.raises(NoDecisionError, match=r"other family .*0b0b.*--family DIR"):
        await classify(rig.requester())


async def test_policy_variants_and_budgets() -> None:
    """A policy narrows the variants: a named set, a MACs budget, a latency budget."""
    cheap = Rig(
        manifest_of(
            spec("V1", acc=0.90, macs=500),
            spec("V2", acc=0.92, macs=800),
            spec("V3", acc=0.88, macs=400),
        )
    )
    try:
        peers = {v: cheap.peer(v, says({3: 0.9})) for v in ("V1", "V2", "V3")}
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
    excluded = rig.peer("V1", says({3: 0.9}), identity=bad_id)
    other = rig.peer("V1", says({3: 0.9}), identity=good_id)
    result = await classify(rig.requester())
    assert [r.peer for r in result.replies] == [other.peer_id]
    assert excluded.asks == []


async def test_local_replica_is_asked_in_process(rig: Rig) -> None:
    """The requester's own variant is served by LocalInfer, never over a link."""

    class Model:
        def __init__(self, spec: ModelSpec) -> None:
            self.spec = spec
            self.calls = 0

        async def infer(self, x: object) -> InferenceResult:
            self.calls += 1
            assert getattr(x, "shape", None) == config.INPUT_SHAPE
            return InferenceResult(probs=probs({3: 0.9}), seconds=0.0001, batch_size=1)

    model = Model(rig.manifest.get("V1"))
    # It is on no network: an ask over a link would fail and show up as missing.
    announce(rig.table, rig.identity, model.spec, family=rig.family)
    rig.peer("V2", says({3: 0.9}))
    requester = rig.requester(local=LocalInfer(model))
    result = await classify(requester)
    assert model.calls == 1
    assert rig.identity.peer_id in {r.peer for r in result.replies}
    assert result.missing == ()
    assert rig.identity.peer_id not in transport_of(requester).opened


# --- learning ----------------------------------------------------------------------------


async def test_reputation_recorded_from_certified_decisions(rig7: Rig) -> None:
    """A clear decision records agreement for every ballot; the dissenter scores lower."""
    agreeing = [rig7.peer(v, says({3: 0.9})) for v in ("V1", "V2", "V3", "V4")]
    dissent = rig7.peer("V5", says({5: 0.9}))
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
    rig.peer("V1", says({3: 0.6}))
    rig.peer("V2", says({5: 0.6}))
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
    peer = rig.peer("V1", says({3: 0.9}))
    requester = rig.requester()
    with pytest.raises(ConfigError):
        await classify(requester, **kw)
    assert peer.asks == []
    assert not transport_of(requester).opened


async def test_aclose_is_idempotent_and_final(rig: Rig) -> None:
    """aclose twice is fine; a closed requester refuses to classify."""
    rig.peer("V1", says({3: 0.9}))
    async with rig.requester() as requester:
        await classify(requester)
    await requester.aclose()
    with pytest.raises(ConfigError, match="closed"):
        await classify(requester)


async def test_aclose_ends_the_calls_still_waiting_at_once(rig: Rig) -> None:
    """Calls waiting on peers when the requester closes end now, not at their deadline."""
    rig.peer("V1", hangs({3: 0.9}))
    requester = rig.requester()
    await requester.start()
    calls = [asyncio.ensure_future(classify(requester, deadline_ms=30_000)) for _ in range(3)]
    await asyncio.sleep(0.05)  # one exchange out, two asks queued behind it
    started = asyncio.get_running_loop().time()
    await requester.aclose()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert all(isinstance(r, NoDecisionError) for r in results)
    assert asyncio.get_running_loop().time() - started < 5


# --- replicas, stragglers, recovery ------------------------------------------------------


async def test_replicas_all_asks_every_peer(rig: Rig) -> None:
    """Policy(replicas=None) gets one ballot per peer; the default one per variant."""
    for v in ("V1", "V1", "V2"):
        rig.peer(v, says({3: 0.8}))
    requester = rig.requester()
    one_each = await classify(requester, quorum=2)
    assert sorted(r.variant for r in one_each.replies) == ["V1", "V2"]
    every = await classify(requester, quorum=3, policy=Policy(replicas=None))
    assert sorted(r.variant for r in every.replies) == ["V1", "V1", "V2"]
    assert len({r.peer for r in every.replies}) == 3


async def test_replicas_all_outvotes_liars_that_hold_most_variants(rig7: Rig) -> None:
    """Three liars, each the only copy of its variant, flip a per-variant vote, not per-peer."""
    for v in ("V1", "V2", "V3"):
        rig7.peer(v, says({7: 1.0}))
    for v in ("V4", "V4", "V5", "V5"):
        rig7.peer(v, says({3: 0.9, 1: 0.05}))
    requester = rig7.requester()
    per_variant = await classify(requester, quorum=5)
    assert per_variant.label == 7  # 3 of the 5 ballots lie: no rule can hold that
    per_peer = await classify(requester, quorum=7, policy=Policy(replicas=None))
    assert per_peer.label == 3
    assert len(per_peer.replies) == 7


async def test_straggler_cut_off_by_early_exit_is_backed_off(rig: Rig) -> None:
    """A peer still silent past the hedge delay, when its siblings and the replica the
    hedge asked answered quickly, is backed off once the call is decided without it."""
    hung = rig.peer("V1", hangs({3: 0.8}))
    backup = rig.peer("V1", slow(0.01, {3: 0.8}))  # the replica the hedge goes to
    # A split vote: the call waits for V1, so the hedge fires.
    rig.peer("V2", slow(0.01, {3: 0.9}))
    rig.peer("V3", slow(0.01, {5: 0.9}))
    requester = rig.requester(timings=dataclasses.replace(TIMINGS, hedge_after_s=0.05))
    requester.observe_latency(backup.peer_id, 500.0)  # ranked second: asked by the hedge
    result = await classify(requester)
    assert result.skipped == (hung.peer_id,)
    assert failures(rig, hung) == 1
    assert hung.peer_id not in {r.peer_id for r in rig.table.candidates()}


async def test_peer_as_slow_as_its_siblings_is_not_backed_off(rig: Rig) -> None:
    """Under load every reply is slow: a peer cut off past the hedge delay, but no slower
    than the replies that were counted, is not taken for a straggler."""
    rig.peer("V1", slow(0.12, {3: 0.9}))
    rig.peer("V2", slow(0.12, {3: 0.9}))
    rig.peer("V3", slow(0.16, {3: 0.9}))  # a little slower: cut off by early exit
    requester = rig.requester(timings=dataclasses.replace(TIMINGS, hedge_after_s=0.05))
    result = await classify(requester)
    assert len(result.skipped) == 1
    record = rig.table.get(result.skipped[0])
    assert record is not None
    assert record.failures == 0


async def test_fast_sibling_skipped_in_time_is_not_backed_off(rig: Rig) -> None:
    """Early exit before the hedge delay does not count against the peers it cut off."""
    rig.peer("V1", says({3: 0.9}))
    rig.peer("V2", says({3: 0.9}))
    rig.peer("V3", slow(0.5, {3: 0.9}))
    result = await classify(rig.requester())  # hedge_after_s is 30 s
    assert result.skipped
    assert all((r := rig.table.get(p)) is not None and r.failures == 0 for p in result.skipped)


@pytest.mark.parametrize("coalesce", [True, False])
async def test_a_bug_in_one_ask_costs_its_reply_not_the_call(rig: Rig, coalesce: bool) -> None:
    """An ask that fails with an exception no SwarmError (a bug, here in the transport)
    leaves its peer missing; the other replies decide the call."""
    broken = rig.peer("V1", says({3: 0.9}))
    rig.peer("V2", says({3: 0.9}))
    rig.peer("V3", says({3: 0.9}))
    requester = rig.requester(coalesce=coalesce)
    transport_of(requester).bugged.add(broken.peer_id)
    with capture_logs() as logs:
        result = await classify(requester, quorum=2, policy=ALL_AT_ONCE)
    crashed = [e for e in logs if e["event"] == "exchange_crashed"]
    assert [e["peer"] for e in crashed] == [broken.peer_id]
    assert result.label == 3
    assert result.missing == (broken.peer_id,)
    assert {r.variant for r in result.replies} == {"V2", "V3"}


async def test_a_bug_in_the_asking_costs_its_reply_not_the_call(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ask whose future fails with an exception no SwarmError reaches the fan-out's
    own guard: logged as a crash, its peer missing, the call decided by the others."""
    broken = rig.peer("V1", says({3: 0.9}))
    rig.peer("V2", says({3: 0.9}))
    rig.peer("V3", says({3: 0.9}))
    requester = rig.requester()
    ask_peer = requester.ask_peer

    def buggy(record: PeerRecord, request: InferRequest) -> asyncio.Future[Answer]:
        if record.peer_id != broken.peer_id:
            return ask_peer(record, request)
        failed: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        failed.set_exception(RuntimeError("a bug"))
        return failed

    monkeypatch.setattr(requester, "ask_peer", buggy)
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
    request = build_request(
        swarm=SWARM,
        family=rig.family,
        requester_id=rig.identity.peer_id,
        tensor=TENSOR,
        deadline_ms=5000,
    )
    return requester.ask_peer(record, request)


async def test_a_lone_ask_cancelled_before_it_starts_leaves_its_peer_free(rig: Rig) -> None:
    """An ask cancelled at once (a call stopped in the step that asked) must not leave
    its peer's queue busy: the next call's ask to that peer goes out, it does not wait
    for an exchange that never ran."""
    rig.peer("V1", says({3: 0.9}))
    requester = rig.requester()
    ask = _ask(rig, requester, rig.peers[0])
    ask.cancel()  # before the task that would run the exchange took its first step
    with pytest.raises(asyncio.CancelledError):
        await ask
    result = await classify(requester)
    assert result.label == 3
    assert [r.variant for r in result.replies] == ["V1"]


async def test_suspected_peer_is_probed_and_taken_back(rig: Rig) -> None:
    """A suspected peer is probed; it becomes a candidate again once it is reachable."""
    lost = rig.peer("V1", says({3: 0.8}), reachable=False)
    rig.peer("V2", says({3: 0.8}))
    for _ in range(TIMINGS.suspect_after_failures):
        rig.table.report_failure(lost.peer_id, now=0.0)
    assert lost.peer_id not in {r.peer_id for r in rig.table.candidates()}
    recovered = asyncio.Event()
    rig.table.add_listener(lambda event, record: recovered.set() if event == "recovered" else None)
    requester = rig.requester(timings=dataclasses.replace(TIMINGS, probe_interval_s=0.01))
    first = await classify(requester)
    assert [r.variant for r in first.replies] == ["V2"]
    async with asyncio.timeout(5):
        await transport_of(requester).probed.wait()
        assert lost.peer_id not in {r.peer_id for r in rig.table.candidates()}  # unreachable
        rig.network.peers[lost.peer_id].reachable = True
        await recovered.wait()
    assert lost.peer_id in {r.peer_id for r in rig.table.candidates()}
    second = await classify(requester, quorum=2)
    assert {r.variant for r in second.replies} == {"V1", "V2"}


# --- waves ---------------------------------------------------------------------------------


def wave_peers(rig: Rig, says_by_variant: dict[str, Behaviour]) -> dict[str, FakePeer]:
    return {v: rig.peer(v, b) for v, b in says_by_variant.items()}


async def test_wave_asks_only_the_first_slots_when_they_settle(rig7: Rig) -> None:
    """Three confident agreeing replies settle five ballots: the other two are never asked,
    and the label is the one asking everyone gives."""
    peers = wave_peers(rig7, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
    requester = rig7.requester()
    result = await classify(requester, policy=Policy(wave=3))
    asked = {v for v, p in peers.items() if p.asks}
    assert len(asked) == 3
    assert {r.variant for r in result.replies} == asked
    assert result.skipped == result.missing == ()
    everyone = await classify(requester, quorum=5)
    assert result.label == everyone.label == 3


async def test_wave_asks_the_reserve_when_the_first_wave_leaves_it_open(rig7: Rig) -> None:
    """A split first wave cannot settle: the reserve is asked and decides."""
    peers = wave_peers(
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
    assert all(p.asks for p in peers.values())
    assert result.label == 3
    assert len(result.replies) == 5


async def test_wave_calls_the_reserve_when_a_first_wave_slot_runs_out(rig7: Rig) -> None:
    """A first-wave peer that fails while another hangs: the reserve is asked at once, and
    the call settles without waiting for the hung one."""
    peers = wave_peers(
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
    assert peers["V4"].asks and peers["V5"].asks
    assert result.label == 3
    assert result.missing == (peers["V1"].peer_id,)
    assert result.skipped == (peers["V2"].peer_id,)


async def test_wave_calls_the_reserve_at_the_hedge_delay(rig7: Rig) -> None:
    """A first-wave peer still silent at the hedge delay: the reserve is asked then."""
    peers = wave_peers(
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
    assert peers["V4"].asks and peers["V5"].asks
    assert result.label == 3
    assert result.skipped == (peers["V1"].peer_id,)


# Five variants whose models cost differently (manifest latency), the cheaper ones mostly
# less accurate: (accuracy, latency ms).
PRICED = {"V1": (0.93, 0.35), "V2": (0.9, 0.1), "V3": (0.91, 0.3), "V4": (0.92, 0.2)}
PRICED["V5"] = (0.95, 0.5)


def priced_rig() -> Rig:
    return Rig(manifest_of(*(spec(v, acc=a, latency_ms=ms) for v, (a, ms) in PRICED.items())))


async def test_wave_asks_the_cheapest_models_first() -> None:
    """Which slots go first cannot change the label, so the first wave is the three
    models that cost least per unit of weight, not the three most accurate (V5, V1, V4);
    the two others are asked only when the label stays open."""
    rig = priced_rig()
    try:
        peers = wave_peers(rig, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
        result = await classify(rig.requester(), policy=Policy(wave=3))
        assert {v for v, p in peers.items() if p.asks} == {"V2", "V4", "V3"}
        assert {r.variant for r in result.replies} == {"V2", "V4", "V3"}
    finally:
        await rig.aclose()


async def test_wave_asks_a_cheap_peer_of_poor_reputation_last() -> None:
    """The rank is cost per unit of trust: the cheapest model's peer, once its answers
    disagreed often enough to weigh a quarter (or nothing), waits in the reserve."""
    rig = priced_rig()
    try:
        peers = wave_peers(rig, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
        doubted = peers["V2"].peer_id
        for _ in range(50):
            if rig.reputation.weight(doubted) <= 0.25:
                break
            rig.reputation.record(doubted, agreed=False)
        assert rig.reputation.weight(doubted) <= 0.25
        await classify(rig.requester(), policy=Policy(wave=3))
        assert {v for v, p in peers.items() if p.asks} == {"V4", "V3", "V1"}
    finally:
        await rig.aclose()


def test_first_wave_key_ranks_by_cost_per_unit_of_trust() -> None:
    """``first_wave_key``: the model's latency per unit of the weight a ballot may carry,
    lowest first; the heavier ballot first at equal cost; a weightless slot last."""

    def slot(name: str, latency_ms: float, weight_bound: float) -> Replicas:
        return Replicas(spec(name, latency_ms=latency_ms), collections.deque(), weight_bound)

    slots = [
        slot(name, ms, acc) for name, (acc, ms) in PRICED.items()
    ]  # V1 0.376, V2 0.111, V3 0.330, V4 0.217, V5 0.526 ms per unit
    # Vlight and Vheavy cost 0.25 ms per unit alike.
    slots += [slot("Vlight", 0.05, 0.2), slot("Vheavy", 0.1, 0.4), slot("Vnone", 0.01, 0.0)]
    ranked = [s.spec.name for s in sorted(slots, key=first_wave_key)]
    assert ranked == ["V2", "V4", "Vheavy", "Vlight", "V3", "V1", "V5", "Vnone"]


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
    peers = wave_peers(rig7, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
    results = await concurrent_calls(rig7.requester(), 6, quorum=1)
    assert [r.wave for r in results] == [None, None, 3, 3, 3, 3]
    assert [len(r.replies) for r in results] == [5, 5, 3, 3, 3, 3]
    assert all(r.label == 3 and not r.missing and not r.rejected for r in results)
    asks = sorted(len(p.asks) for p in peers.values())
    assert asks == [2, 2, 6, 6, 6]  # the reserve, asked only by the first two calls
    alone = await classify(rig7.requester())
    assert (alone.wave, len(alone.replies)) == (None, 5)  # nothing else in flight


async def test_auto_wave_never_holds_back_ballots_a_quorum_needs(
    rig7: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a call asks a majority first, or its quorum when that is more."""
    monkeypatch.setattr(config, "WAVE_IN_FLIGHT", 1)  # every call counts as under load
    wave_peers(rig7, {f"V{i}": says({3: 0.95}) for i in range(1, 6)})
    requester = rig7.requester()
    assert (await classify(requester)).wave == 3
    assert (await classify(requester, quorum=4)).wave == 4
    assert (await classify(requester, quorum=5)).wave is None  # every ballot at once
    assert (await classify(requester, policy=ALL_AT_ONCE)).wave is None


# --- coalescing ----------------------------------------------------------------------------


async def test_concurrent_asks_to_a_busy_peer_go_as_batches(rig: Rig) -> None:
    """Twelve calls at once: the asks waiting behind a peer's exchange go together as one
    group; every call is decided from three verified replies."""
    peers = [rig.peer(v, slow(0.05, {3: 0.9})) for v in ("V1", "V2", "V3")]
    results = await concurrent_calls(rig.requester(), 12)
    assert [r.label for r in results] == [3] * 12
    assert all(len(r.replies) == 3 and not r.rejected for r in results)
    for peer in peers:
        assert max(peer.group_sizes) > 1, "the asks queued behind a busy exchange went as one"
        assert sum(peer.group_sizes) == 12  # one ask per call, none lost
        assert len(peer.groups) < 12  # fewer exchanges than calls


async def test_asks_for_a_busy_peer_wait_for_its_one_exchange(rig: Rig) -> None:
    """While one exchange with a peer is out, the next asks wait and go together when it
    ends: a larger batch for the peer's model rather than a second exchange."""
    peer = rig.peer("V1", hangs({3: 0.9}))
    requester = rig.requester()
    calls = [asyncio.create_task(classify(requester)) for _ in range(3)]
    await asyncio.wait_for(peer.received.wait(), 5)
    peer.release.set()
    results = await asyncio.gather(*calls)
    assert [r.label for r in results] == [3, 3, 3]
    assert peer.group_sizes == [1, 2]


async def test_a_full_batch_opens_a_second_exchange_while_one_is_out(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer so busy that a full batch waits for it gets that batch at once, on a second
    exchange, while the first is still out."""
    monkeypatch.setattr(config, "MAX_BATCH_ITEMS", 2)
    peer = rig.peer("V1", hangs({3: 0.9}))
    requester = rig.requester()
    calls = [asyncio.create_task(classify(requester)) for _ in range(3)]
    await asyncio.wait_for(peer.grouped.wait(), 5)
    assert not peer.release.is_set()
    assert peer.group_sizes == [1, 2]
    peer.release.set()
    assert [r.label for r in await asyncio.gather(*calls)] == [3, 3, 3]


async def test_coalescing_off_sends_every_ask_alone(rig: Rig) -> None:
    """With coalescing off every ask is an exchange of its own."""
    peers = [rig.peer(v, slow(0.05, {3: 0.9})) for v in ("V1", "V2", "V3")]
    results = await concurrent_calls(rig.requester(coalesce=False), 6)
    assert [r.label for r in results] == [3] * 6
    assert all(p.group_sizes == [1] * 6 for p in peers)


async def test_a_reply_batch_with_a_bad_signature_is_rejected_item_by_item(rig: Rig) -> None:
    """A batch signed with a key the peer did not announce, whose replies dissent: every
    item of it is checked, rejected as bad_signature and not counted, against its peer;
    the calls decide from the other peers."""
    rig.peer("V1", slow(0.1, {3: 0.9}))
    rig.peer("V2", slow(0.1, {3: 0.9}))
    # Faster than the others, so its batch comes in before any call can exit early.
    forger = rig.peer("V3", slow(0.02, {7: 1.0}), signer=stranger)
    requester = rig.requester()
    results = await concurrent_calls(requester, 12, quorum=1, policy=ALL_AT_ONCE)
    assert max(forger.group_sizes) > 1
    assert all(r.label == 3 for r in results)
    rejected = [x for r in results for x in r.rejected]
    assert sum(forger.group_sizes) == len(rejected) == 12
    assert {(x.peer, x.reason) for x in rejected} == {(forger.peer_id, "bad_signature")}
    assert rejections(rig, "bad_signature") == len(rejected)
    assert rig.reputation.score(forger.peer_id) < PRIOR_SCORE  # its link proved it sent them


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
    peers = [rig.peer("V1", slow(0.1, {3: 0.9})), rig.peer("V2", slow(0.1, {3: 0.9}))]
    # Agrees, so its replies count on their link; every signature of it is bad.
    forger = rig.peer("V3", slow(0.02, {3: 0.9}), signer=stranger)
    peers.append(forger)
    requester = rig.requester()
    with capture_logs() as logs:
        results = await concurrent_calls(requester, 12, quorum=1, policy=ALL_AT_ONCE)
        await asyncio.sleep(0)  # the checks run on the next turn of the loop
    assert all(r.label == 3 and forger.peer_id in {b.peer for b in r.replies} for r in results)
    assert max(forger.group_sizes) > 1, "the forger's asks went as batches"
    found = {e["request"] for e in logs if e["event"] == "late_bad_signature"}
    assert found, "the first draw samples, and the forger's every reply fails"
    for ids in forger.groups:
        assert set(ids) <= found or not found & set(ids), "a batch is checked whole or not"
    # One draw per batch that has a counted reply, not one per reply.
    counted = {(r.request_id, x.peer) for r in results for x in r.replies}
    batches = [
        ids for p in peers for ids in p.groups if any((i, p.peer_id) in counted for i in ids)
    ]
    assert len(drawn) == len(batches) < len(counted)


class RefusesFirst(FakePeer):
    """Refuses the first ask of every group of several; answers the rest."""

    async def answer(self, requester_id: str, asks: Sequence[Ask]) -> ReplyBatch:
        if len(asks) == 1:
            return await super().answer(requester_id, asks)
        self.groups.append([a.request_id for a in asks])
        first, *rest = asks
        items: list[Reply] = [ItemError(first.request_id, "stale", "issued too long ago")]
        items += [await self.answer_one(requester_id, a) for a in rest]
        return self.sign(items)


async def test_a_refused_batch_item_fails_only_that_ask(rig: Rig) -> None:
    """A peer that refuses one item of a batch: that call misses its reply; the others
    in the batch are answered and counted."""
    rig.peer("V1", slow(0.1, {3: 0.9}))
    rig.peer("V2", slow(0.1, {3: 0.9}))
    # Its batch comes in before any early exit.
    odd = rig.peer("V3", slow(0.01, {3: 0.9}), cls=RefusesFirst)
    requester = rig.requester()
    results = await concurrent_calls(requester, 12, quorum=1, policy=ALL_AT_ONCE)
    assert odd.group_sizes == [1, 11]
    missing = [r for r in results if odd.peer_id in r.missing]
    assert len(missing) == 1
    answered = [r for r in results if odd.peer_id in {x.peer for x in r.replies}]
    assert len(answered) == 11
    assert all(r.label == 3 for r in results)
