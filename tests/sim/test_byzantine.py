"""The attacks: each rejectable lie is rejected by the requester's checks (the batch
signature, then each reply's binding), each outvote lie verifies but names a wrong class."""

from __future__ import annotations

import numpy as np
import pytest

from sim.byzantine import (
    ATTACKS,
    EXPECTED_REJECTION,
    HONEST,
    OUTVOTE_ATTACKS,
    Attacker,
    collude_class,
)
from swarm.crypto.identity import Identity, TrustStore
from swarm.errors import VerificationError
from swarm.wire import codec, verify
from swarm.wire.messages import PPM, InferReply, InferRequest, ReplyBatch, build_request, unix_ms

SWARM = "simtest"
FAMILY = "fa" * 16
SHA = "a" * 64


def _request(requester: Identity, seed: int) -> InferRequest:
    x = np.random.default_rng(seed).random((1, 28, 28), dtype=np.float32)
    return build_request(
        swarm=SWARM, family=FAMILY, requester_id=requester.peer_id, tensor=x, deadline_ms=1000
    )


def _honest(peer: Identity, request: InferRequest) -> InferReply:
    probs = np.full(10, 0.02, dtype=np.float64)
    probs[3] = 0.82
    return codec.build_reply(
        request, responder_id=peer.peer_id, variant="V1", model_sha256=SHA, probs=probs,
        infer_us=100,
    )  # fmt: skip


def _verify(reply: InferReply, request: InferRequest, peer: Identity) -> None:
    verify.verify_reply(
        reply,
        request=request,
        expected_peer_id=peer.peer_id,
        expected_key=peer.public_key,
        trust=TrustStore.open(),
        now_ms=unix_ms(),
        freshness_s=30.0,
        expected_variant="V1",
        expected_model_sha256=SHA,
    )


@pytest.fixture
def keys() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


@pytest.mark.parametrize("attack", ["inflate", "replay", "misbind"])
def test_rejectable_lies_are_rejected_with_their_reason(
    keys: tuple[Identity, Identity], attack: str
) -> None:
    requester, peer = keys
    attacker = Attacker(peer, mode=HONEST)
    for seed in range(3):  # honest history first, so the replayer has old replies
        request = _request(requester, seed)
        _verify(attacker.tamper(_honest(peer, request)), request, peer)
    attacker.set_mode(attack)
    for seed in range(3, 8):
        request = _request(requester, seed)
        with pytest.raises(VerificationError) as info:
            _verify(attacker.tamper(_honest(peer, request)), request, peer)
        assert info.value.reason == EXPECTED_REJECTION[attack]


def test_replay_without_history_is_still_rejected(keys: tuple[Identity, Identity]) -> None:
    requester, peer = keys
    attacker = Attacker(peer, mode="replay")
    request = _request(requester, 0)
    with pytest.raises(VerificationError) as info:
        _verify(attacker.tamper(_honest(peer, request)), request, peer)
    assert info.value.reason == verify.WRONG_BINDING


@pytest.mark.parametrize("attack", OUTVOTE_ATTACKS)
def test_outvote_lies_verify_but_name_a_wrong_class(
    keys: tuple[Identity, Identity], attack: str
) -> None:
    requester, peer = keys
    attacker = Attacker(peer, mode=attack, target=0, seed=1)
    wrong = 0
    for seed in range(20):
        request = _request(requester, seed)
        lie = attacker.tamper(_honest(peer, request))
        _verify(lie, request, peer)  # validly signed and bound: it must be outvoted
        assert lie.topk[0][1] == PPM
        wrong += lie.topk[0][0] != 3
    assert wrong >= (20 if attack != "random" else 12)


def test_colluders_agree_on_every_input(keys: tuple[Identity, Identity]) -> None:
    requester, peer = keys
    other = Identity.generate()
    a, b = Attacker(peer, mode="collude"), Attacker(other, mode="collude")
    request = _request(requester, 0)
    lie_a = a.tamper(_honest(peer, request))
    lie_b = b.tamper(_honest(other, request))
    assert lie_a.topk == lie_b.topk == ((collude_class(3), PPM),)


def test_honest_and_claim_modes_pass_the_reply_through(keys: tuple[Identity, Identity]) -> None:
    requester, peer = keys
    request = _request(requester, 0)
    honest = _honest(peer, request)
    for mode in (HONEST, "claim"):
        assert Attacker(peer, mode=mode).tamper(honest) is honest


def test_unknown_mode_and_target_are_refused(keys: tuple[Identity, Identity]) -> None:
    attacker = Attacker(keys[1])
    with pytest.raises(ValueError, match="unknown mode"):
        attacker.set_mode("sneaky")
    with pytest.raises(ValueError, match="target"):
        attacker.set_mode("targeted", 10)
    assert set(EXPECTED_REJECTION) | set(OUTVOTE_ATTACKS) == set(ATTACKS)


def _verify_batch(
    batch: ReplyBatch, requests: list[InferRequest], peer: Identity
) -> list[InferReply]:
    """What the requester checks of a reply batch: its signature, then each reply."""
    verify.verify_reply_batch(batch, expected_key=peer.public_key)
    replies = list(batch.replies)
    for reply, request in zip(replies, requests, strict=True):
        _verify(reply, request, peer)
    return replies


def _honest_batch(peer: Identity, requests: list[InferRequest]) -> ReplyBatch:
    return codec.sign_replies(peer, [_honest(peer, r) for r in requests])


@pytest.mark.parametrize("attack", ["inflate", "replay", "misbind", "forge"])
def test_rejectable_lies_in_a_batch_are_rejected_with_their_reason(
    keys: tuple[Identity, Identity], attack: str
) -> None:
    """A liar answering a batch lies in every item; the batch is caught for the same
    reason as a single reply (a forged one by the batch signature)."""
    requester, peer = keys
    attacker = Attacker(peer, mode=HONEST)
    history = [_request(requester, seed) for seed in range(3)]
    _verify_batch(attacker.tamper_batch(_honest_batch(peer, history)), history, peer)
    attacker.set_mode(attack)
    requests = [_request(requester, seed) for seed in range(3, 6)]
    with pytest.raises(VerificationError) as info:
        _verify_batch(attacker.tamper_batch(_honest_batch(peer, requests)), requests, peer)
    assert info.value.reason == EXPECTED_REJECTION[attack]


def test_outvote_lies_in_a_batch_verify_but_name_a_wrong_class(
    keys: tuple[Identity, Identity],
) -> None:
    requester, peer = keys
    attacker = Attacker(peer, mode="collude")
    requests = [_request(requester, seed) for seed in range(4)]
    replies = _verify_batch(attacker.tamper_batch(_honest_batch(peer, requests)), requests, peer)
    assert [r.topk[0][0] for r in replies] == [collude_class(3)] * 4
