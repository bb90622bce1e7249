"""Tests of swarm.wire.verify: a reply's binding to its request, and its batch's signature."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from swarm.crypto.identity import Identity, TrustStore
from swarm.errors import VerificationError
from swarm.wire import codec
from swarm.wire.messages import InferReply, InferRequest
from swarm.wire.verify import (
    ATTRIBUTABLE_REPLY_REASONS,
    BAD_SIGNATURE,
    BAD_TOPK,
    REJECT_REASONS,
    STALE,
    WRONG_BINDING,
    WRONG_KEY,
    WRONG_PEER,
    WRONG_VARIANT,
    verify_reply,
    verify_reply_batch,
)
from tests.swarm.signed import MODEL_SHA, NOW

FRESH_S = 30.0


def check(reply: InferReply, req: InferRequest, responder: Identity, **kw: Any) -> None:
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


def rebuilt(reply: InferReply, **changes: Any) -> InferReply:
    fields = {f.name: getattr(reply, f.name) for f in dataclasses.fields(reply) if f.name != "raw"}
    fields.update(changes)
    return InferReply(**fields, raw=codec.encode_reply(**fields))


def test_a_valid_reply_passes(
    reply_msg: InferReply, request_msg: InferRequest, responder: Identity
) -> None:
    """A fresh reply bound to the request, from the peer asked, running its variant."""
    check(reply_msg, request_msg, responder)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"swarm": "other"}, WRONG_BINDING),
        ({"family": "0b" * 16}, WRONG_BINDING),
        ({"request_id": "1" * 32}, WRONG_BINDING),
        ({"requester_id": "f" * 20}, WRONG_BINDING),
        ({"input_sha256": "0" * 64}, WRONG_BINDING),
        ({"variant": "other"}, WRONG_VARIANT),
        ({"model_sha256": "cd" * 32}, WRONG_VARIANT),
        ({"issued_at_ms": NOW - 60_000}, STALE),
        ({"topk": ((1, 600_000), (1, 300_000))}, BAD_TOPK),
        ({"topk": ((1, 300_000), (3, 600_000))}, BAD_TOPK),
        ({"topk": ((1, 900_000), (3, 900_000))}, BAD_TOPK),
        ({"topk": ((10, 900_000),)}, BAD_TOPK),
        ({"topk": ((1, 5), (2, 4), (3, 3))}, BAD_TOPK),  # more than the k asked
    ],
)
def test_each_fault_of_signed_content_is_rejected_with_its_reason(
    reply_msg: InferReply,
    request_msg: InferRequest,
    responder: Identity,
    change: dict[str, Any],
    reason: str,
) -> None:
    """Binding, variant, freshness and top-k faults each have their reason."""
    with pytest.raises(VerificationError) as info:
        check(rebuilt(reply_msg, **change), request_msg, responder)
    assert info.value.reason == reason
    assert reason in ATTRIBUTABLE_REPLY_REASONS


def test_reply_from_another_peer_or_key_is_rejected(
    reply_msg: InferReply, request_msg: InferRequest, responder: Identity
) -> None:
    """A reply naming another responder, or a key not the announced peer's, is refused."""
    with pytest.raises(VerificationError) as info:
        check(rebuilt(reply_msg, responder_id="e" * 20), request_msg, responder)
    assert info.value.reason == WRONG_PEER
    other = Identity.generate()
    with pytest.raises(VerificationError) as info:
        check(reply_msg, request_msg, responder, expected_key=other.public_key)
    assert info.value.reason == WRONG_KEY
    untrusted = TrustStore.from_keys([other.public_key])
    with pytest.raises(VerificationError) as info:
        check(reply_msg, request_msg, responder, trust=untrusted)
    assert info.value.reason == WRONG_KEY


def test_variant_check_is_skipped_when_nothing_was_announced(
    reply_msg: InferReply, request_msg: InferRequest, responder: Identity
) -> None:
    """Without an announced variant or model, any is accepted."""
    check(
        rebuilt(reply_msg, variant="x"),
        request_msg,
        responder,
        expected_variant=None,
        expected_model_sha256=None,
    )


def test_class_range_follows_the_family(
    reply_msg: InferReply, request_msg: InferRequest, responder: Identity
) -> None:
    """A class index must name one of the family's classes."""
    with pytest.raises(VerificationError) as info:
        check(reply_msg, request_msg, responder, num_classes=2)
    assert info.value.reason == BAD_TOPK


def test_batch_signature_holds_only_for_the_signer_and_the_exact_bytes(
    reply_msg: InferReply, responder: Identity
) -> None:
    """The batch signature covers each reply's exact bytes, under the peer's key."""
    batch = codec.sign_replies(responder, [reply_msg])
    verify_reply_batch(batch, expected_key=responder.public_key)
    with pytest.raises(VerificationError) as info:
        verify_reply_batch(batch, expected_key=Identity.generate().public_key)
    assert info.value.reason == BAD_SIGNATURE
    swapped = dataclasses.replace(batch, items=(rebuilt(reply_msg, infer_us=1),))
    with pytest.raises(VerificationError) as info:
        verify_reply_batch(swapped, expected_key=responder.public_key)
    assert info.value.reason == BAD_SIGNATURE


def test_reject_reasons_are_listed_once() -> None:
    """Every reason is a distinct token."""
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS)
