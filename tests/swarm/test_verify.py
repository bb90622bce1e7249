"""Tests of swarm.wire.verify: accepting and rejecting requests and replies, replays."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from swarm.crypto.identity import Identity, TrustStore
from swarm.errors import VerificationError
from swarm.wire.messages import InferReply, InferRequest
from swarm.wire.verify import (
    ATTRIBUTABLE_REPLY_REASONS,
    BAD_SIGNATURE,
    BAD_TOPK,
    INPUT_MISMATCH,
    REJECT_REASONS,
    REPLAYED,
    STALE,
    UNTRUSTED_KEY,
    WRONG_BINDING,
    WRONG_KEY,
    WRONG_PEER,
    WRONG_SWARM,
    WRONG_VARIANT,
    WRONG_VERSION,
    ReplayCache,
    verify_reply,
    verify_request,
)
from tests.swarm.signed import MODEL_SHA, NOW

FRESH_S = 30.0


def _check_request(req: InferRequest, **overrides: Any) -> None:
    kwargs: dict[str, Any] = {
        "swarm": "lab",
        "trust": TrustStore.open(),
        "now_ms": NOW,
        "freshness_s": FRESH_S,
        "seen": ReplayCache(),
    }
    kwargs.update(overrides)
    verify_request(req, **kwargs)


def _check_reply(reply: InferReply, req: InferRequest, responder: Identity, **kw: Any) -> None:
    kwargs: dict[str, Any] = {
        "request": req,
        "expected_peer_id": responder.peer_id,
        "expected_key": responder.public_key,
        "trust": TrustStore.open(),
        "now_ms": NOW + 10,
        "freshness_s": FRESH_S,
        "expected_variant": "mnv2-w035-r28",
        "expected_model_sha256": MODEL_SHA,
    }
    kwargs.update(kw)
    verify_reply(reply, **kwargs)


# --- verifying requests ---------------------------------------------------------------


def test_verify_request_accepts_a_valid_request(request_msg: InferRequest) -> None:
    """A fresh, signed, trusted request for our swarm passes."""
    _check_request(request_msg)


def _replace_and_resign(req: InferRequest, signer: Identity, **changes: Any) -> InferRequest:
    changed = dataclasses.replace(req, **changes)
    return dataclasses.replace(changed, signature=signer.sign(changed.signed_bytes()))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"version": 2}, WRONG_VERSION),
        ({"swarm": "other"}, WRONG_SWARM),
        ({"requester_id": "0" * 20}, WRONG_KEY),
        ({"issued_at_ms": NOW - 30_001}, STALE),
        ({"issued_at_ms": NOW + 30_001}, STALE),
        ({"input": b"\0" * 3136}, INPUT_MISMATCH),
    ],
)
def test_verify_request_rejects_each_fault(
    request_msg: InferRequest, requester: Identity, change: dict[str, Any], reason: str
) -> None:
    """Each fault of a (correctly signed) request is rejected with its own reason."""
    bad = _replace_and_resign(request_msg, requester, **change)
    with pytest.raises(VerificationError) as info:
        _check_request(bad)
    assert info.value.reason == reason


def test_verify_request_rejects_tampered_fields(request_msg: InferRequest) -> None:
    """Changing a signed field without re-signing breaks the signature."""
    with pytest.raises(VerificationError) as info:
        _check_request(dataclasses.replace(request_msg, k=1))
    assert info.value.reason == BAD_SIGNATURE


def test_verify_request_rejects_key_not_on_allow_list(request_msg: InferRequest) -> None:
    """A closed trust store refuses requesters it does not list."""
    trust = TrustStore.from_keys([Identity.generate().public_key])
    with pytest.raises(VerificationError) as info:
        _check_request(request_msg, trust=trust)
    assert info.value.reason == UNTRUSTED_KEY
    _check_request(request_msg, trust=TrustStore.from_keys([request_msg.requester_key]))


def test_verify_request_rejects_replay_but_not_after_a_forgery(
    request_msg: InferRequest,
) -> None:
    """A request is served once; a forged copy rejected first does not block the real one."""
    seen = ReplayCache()
    forged = dataclasses.replace(request_msg, signature=b"\0" * 64)
    with pytest.raises(VerificationError):
        _check_request(forged, seen=seen)
    _check_request(request_msg, seen=seen)
    with pytest.raises(VerificationError) as info:
        _check_request(request_msg, seen=seen, now_ms=NOW + 1)
    assert info.value.reason == REPLAYED


def test_replay_cache_expires_entries_and_stays_bounded() -> None:
    """Entries expire at their deadline, and the oldest goes first when the table is full."""
    cache = ReplayCache(max_entries=3)
    cache.add("p", "a", expires_at_ms=100, now_ms=0)
    assert cache.seen("p", "a", now_ms=99)
    assert not cache.seen("p", "a", now_ms=100)
    assert not cache.seen("q", "a", now_ms=0)  # keyed by requester too
    for rid in "bcde":
        cache.add("p", rid, expires_at_ms=1000, now_ms=50)
    assert len(cache) == 3
    assert not cache.seen("p", "b", now_ms=60)
    assert cache.seen("p", "e", now_ms=60)


# --- verifying replies ----------------------------------------------------------------


def test_verify_reply_accepts_a_valid_reply(
    reply_msg: InferReply, request_msg: InferRequest, responder: Identity
) -> None:
    """A signed, bound, fresh reply from the peer we asked passes."""
    _check_reply(reply_msg, request_msg, responder)


def _resign_reply(reply: InferReply, signer: Identity, **changes: Any) -> InferReply:
    changed = dataclasses.replace(reply, **changes)
    return dataclasses.replace(changed, signature=signer.sign(changed.signed_bytes()))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"request_id": "f" * 32}, WRONG_BINDING),
        ({"requester_id": "0" * 20}, WRONG_BINDING),
        ({"input_sha256": "0" * 64}, WRONG_BINDING),
        ({"swarm": "other"}, WRONG_BINDING),
        ({"version": 2}, WRONG_BINDING),
        ({"variant": "other"}, WRONG_VARIANT),
        ({"model_sha256": "cd" * 32}, WRONG_VARIANT),
        ({"issued_at_ms": NOW - 40_000}, STALE),
        ({"topk": ((1, 500_000), (2, 300_000), (3, 100_000))}, BAD_TOPK),
        ({"topk": ((1, 500_000), (1, 300_000))}, BAD_TOPK),
        ({"topk": ((1, 300_000), (2, 500_000))}, BAD_TOPK),
        ({"topk": ((1, 900_000), (2, 200_000))}, BAD_TOPK),
        ({"topk": ()}, BAD_TOPK),
    ],
)
def test_verify_reply_rejects_each_signed_fault(
    reply_msg: InferReply,
    request_msg: InferRequest,
    responder: Identity,
    change: dict[str, Any],
    reason: str,
) -> None:
    """Each fault of a reply signed by its peer is rejected with its own, attributable reason."""
    with pytest.raises(VerificationError) as info:
        _check_reply(_resign_reply(reply_msg, responder, **change), request_msg, responder)
    assert info.value.reason == reason
    assert reason in ATTRIBUTABLE_REPLY_REASONS


def test_verify_reply_rejects_bad_signature(
    reply_msg: InferReply, request_msg: InferRequest, responder: Identity
) -> None:
    """A reply altered after signing, or signed by someone else, fails the signature."""
    with pytest.raises(VerificationError) as info:
        _check_reply(dataclasses.replace(reply_msg, topk=((9, 900_000),)), request_msg, responder)
    assert info.value.reason == BAD_SIGNATURE
    forged = _resign_reply(reply_msg, Identity.generate())
    with pytest.raises(VerificationError) as info:
        _check_reply(forged, request_msg, responder)
    assert info.value.reason == BAD_SIGNATURE


def test_verify_reply_rejects_wrong_peer_and_wrong_key(
    reply_msg: InferReply, request_msg: InferRequest, responder: Identity
) -> None:
    """A reply from another peer, or a key that is not the peer's or not trusted, fails."""
    other = Identity.generate()
    with pytest.raises(VerificationError) as info:
        _check_reply(
            reply_msg,
            request_msg,
            responder,
            expected_peer_id=other.peer_id,
            expected_key=other.public_key,
        )
    assert info.value.reason == WRONG_PEER
    with pytest.raises(VerificationError) as info:
        _check_reply(reply_msg, request_msg, responder, expected_key=other.public_key)
    assert info.value.reason == WRONG_KEY
    closed = TrustStore.from_keys([other.public_key])
    with pytest.raises(VerificationError) as info:
        _check_reply(reply_msg, request_msg, responder, trust=closed)
    assert info.value.reason == WRONG_KEY


def test_verify_reply_skips_variant_check_when_not_announced(
    reply_msg: InferReply, request_msg: InferRequest, responder: Identity
) -> None:
    """Without an announced variant or model hash, any is accepted."""
    changed = _resign_reply(reply_msg, responder, variant="other", model_sha256="cd" * 32)
    _check_reply(changed, request_msg, responder, expected_variant=None, expected_model_sha256=None)


def test_reject_reasons_are_listed_once() -> None:
    """REJECT_REASONS holds every reason exactly once, attributable ones included."""
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS) == 12
    assert set(ATTRIBUTABLE_REPLY_REASONS) <= set(REJECT_REASONS)
