"""Tests of swarm.crypto.session: the link's signed key exchange and its sealing."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from swarm.crypto.identity import Identity, TrustStore
from swarm.crypto.session import HelloGuard, Offer, Sealer, SealError
from swarm.errors import VerificationError
from swarm.wire import codec, verify
from swarm.wire.messages import HELLO_TAG, LinkHello, LinkWelcome, unix_ms
from tests.swarm.signed import FAMILY

SWARM = "test-swarm"
FRESH_S = 30.0


def guard_of(peer: Identity, **kw: Any) -> HelloGuard:
    kw.setdefault("trust", TrustStore.open())
    kw.setdefault("family", FAMILY)
    return HelloGuard(peer, swarm=SWARM, freshness_s=FRESH_S, max_asks=64, **kw)


def handshake(
    requester: Identity, peer: Identity, guard: HelloGuard
) -> tuple[Offer, LinkWelcome, tuple[Sealer, Sealer], tuple[Sealer, Sealer]]:
    """(offer, welcome, the requester's (out, in), the peer's (out, in))."""
    offer = Offer(requester, swarm=SWARM, family=FAMILY)
    welcome, peer_out, peer_in = guard.accept(offer.hello, now_ms=unix_ms())
    mine = offer.accept(
        welcome,
        expected_peer_id=peer.peer_id,
        expected_key=peer.public_key,
        now_ms=unix_ms(),
        freshness_s=FRESH_S,
    )
    return offer, welcome, mine, (peer_out, peer_in)


def hello_with(requester: Identity, signer: Identity | None = None, **changes: Any) -> LinkHello:
    """A hello of ``requester`` with ``changes``, encoded and signed anew (by ``signer``)."""
    fields = {
        "swarm": SWARM,
        "family": FAMILY,
        "requester_id": requester.peer_id,
        "requester_key": requester.public_key,
        "exchange_key": Offer(requester, swarm=SWARM, family=FAMILY).hello.exchange_key,
        "issued_at_ms": unix_ms(),
    }
    fields.update(changes)
    body = codec.hello_body(**fields)
    signature = (signer or requester).sign(HELLO_TAG + body)
    return LinkHello(**fields, body=body, signature=signature)


def test_both_ends_agree_on_two_keys_one_per_direction(
    requester: Identity, responder: Identity
) -> None:
    """What one end seals the other opens, in each direction, and the directions differ."""
    _, _, (mine_out, mine_in), (peer_out, peer_in) = handshake(
        requester, responder, guard_of(responder)
    )
    assert peer_in.open(mine_out.seal(b"ask")) == b"ask"
    assert mine_in.open(peer_out.seal(b"answer")) == b"answer"
    sealed = mine_out.seal(b"ask")
    with pytest.raises(SealError):  # the peer's own sending key cannot open it
        Sealer(b"\x00" * 32).open(sealed)


def test_sealed_message_hides_its_bytes(requester: Identity, responder: Identity) -> None:
    """A sealed message does not contain its plaintext (the input's pixels travel so)."""
    _, _, (out, _), _ = handshake(requester, responder, guard_of(responder))
    secret = bytes(range(200, 256)) * 8
    assert secret[:16] not in out.seal(secret)


@pytest.mark.parametrize("fault", ["replayed", "reordered", "dropped", "tampered", "truncated"])
def test_a_message_out_of_order_or_altered_does_not_open(fault: str) -> None:
    """Counter nonces: replayed, reordered, dropped, tampered or cut messages fail to open."""
    key = bytes(range(32))
    out, into = Sealer(key), Sealer(key)
    first, second = out.seal(b"one"), out.seal(b"two")
    if fault == "replayed":
        assert into.open(first) == b"one"
        bad = first
    elif fault in ("reordered", "dropped"):
        bad = second
    elif fault == "tampered":
        bad = bytes([first[0] ^ 1]) + first[1:]
    else:
        bad = first[:-1]
    with pytest.raises(SealError) as info:
        into.open(bad)
    assert info.value.reason == verify.BAD_SIGNATURE


def test_a_replayed_hello_opens_no_second_link(requester: Identity, responder: Identity) -> None:
    """A hello opens at most one link: the same hello again is refused by a lookup."""
    guard = guard_of(responder)
    offer = Offer(requester, swarm=SWARM, family=FAMILY)
    guard.accept(offer.hello, now_ms=unix_ms())
    with pytest.raises(VerificationError) as info:
        guard.accept(offer.hello, now_ms=unix_ms())
    assert info.value.reason == verify.REPLAYED
    assert len(guard) == 1
    # A new hello of the same requester opens a new link.
    guard.accept(Offer(requester, swarm=SWARM, family=FAMILY).hello, now_ms=unix_ms())


def test_a_forged_copy_does_not_block_the_genuine_hello(
    requester: Identity, responder: Identity
) -> None:
    """A hello refused for its signature is not remembered."""
    guard = guard_of(responder)
    genuine = hello_with(requester)
    stranger = Identity.generate()
    forged = dataclasses.replace(genuine, signature=stranger.sign(genuine.signed_bytes()))
    with pytest.raises(VerificationError):
        guard.accept(forged, now_ms=unix_ms())
    guard.accept(genuine, now_ms=unix_ms())


def test_remembered_hellos_are_bounded(requester: Identity, responder: Identity) -> None:
    """Past its bound the guard forgets its oldest hellos."""
    guard = guard_of(responder, max_entries=3)
    for _ in range(5):
        guard.accept(Offer(requester, swarm=SWARM, family=FAMILY).hello, now_ms=unix_ms())
    assert len(guard) == 3


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"swarm": "other"}, verify.WRONG_SWARM),
        ({"family": "0b" * 16}, verify.WRONG_FAMILY),
        ({"issued_at_ms": 1_000}, verify.STALE),
        ({"requester_id": "f" * 20}, verify.WRONG_KEY),
    ],
)
def test_a_bad_hello_is_refused_with_its_reason(
    requester: Identity, responder: Identity, changes: dict[str, Any], reason: str
) -> None:
    """The peer says why it refuses a hello."""
    with pytest.raises(VerificationError) as info:
        guard_of(responder).accept(hello_with(requester, **changes), now_ms=unix_ms())
    assert info.value.reason == reason


def test_a_hello_signed_by_another_key_is_refused(requester: Identity, responder: Identity) -> None:
    """The hello's signature must be its requester's."""
    hello = hello_with(requester, signer=Identity.generate())
    with pytest.raises(VerificationError) as info:
        guard_of(responder).accept(hello, now_ms=unix_ms())
    assert info.value.reason == verify.BAD_SIGNATURE


def test_an_untrusted_requester_is_refused(requester: Identity, responder: Identity) -> None:
    """With an allow-list, only its keys open links."""
    guard = guard_of(responder, trust=TrustStore.from_keys([responder.public_key]))
    with pytest.raises(VerificationError) as info:
        guard.accept(Offer(requester, swarm=SWARM, family=FAMILY).hello, now_ms=unix_ms())
    assert info.value.reason == verify.UNTRUSTED_KEY


def test_the_requester_checks_the_welcome_against_the_announced_key(
    requester: Identity, responder: Identity
) -> None:
    """A welcome signed by any key but the one the peer announced is refused."""
    impostor = Identity.generate()
    offer = Offer(requester, swarm=SWARM, family=FAMILY)
    welcome, _, _ = guard_of(impostor).accept(offer.hello, now_ms=unix_ms())
    with pytest.raises(VerificationError) as info:
        offer.accept(
            welcome,
            expected_peer_id=responder.peer_id,
            expected_key=responder.public_key,
            now_ms=unix_ms(),
            freshness_s=FRESH_S,
        )
    assert info.value.reason == verify.WRONG_KEY


def test_a_welcome_to_another_hello_is_refused(requester: Identity, responder: Identity) -> None:
    """A welcome binds the hello it answers: one replayed from another link is refused."""
    guard = guard_of(responder)
    other = Offer(requester, swarm=SWARM, family=FAMILY)
    welcome, _, _ = guard.accept(other.hello, now_ms=unix_ms())
    offer = Offer(requester, swarm=SWARM, family=FAMILY)
    with pytest.raises(VerificationError) as info:
        offer.accept(
            welcome,
            expected_peer_id=responder.peer_id,
            expected_key=responder.public_key,
            now_ms=unix_ms(),
            freshness_s=FRESH_S,
        )
    assert info.value.reason == verify.WRONG_BINDING


def test_handshake_messages_round_trip_through_the_codec(
    requester: Identity, responder: Identity
) -> None:
    """Hello and welcome decode to what was sent, signatures included."""
    offer, welcome, _, _ = handshake(requester, responder, guard_of(responder))
    assert codec.decode_hello(codec.encode_handshake(offer.hello)) == offer.hello
    assert codec.decode_welcome(codec.encode_handshake(welcome)) == welcome
