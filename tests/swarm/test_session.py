"""Tests of swarm.crypto.session: the signed key exchange, the keys and MACs, the peer's table."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from swarm.crypto import session
from swarm.crypto.identity import Identity, TrustStore
from swarm.crypto.session import Offer, SessionKeys, SessionTable
from swarm.errors import DecodeError, VerificationError
from swarm.wire import codec as wire

SWARM = "test-swarm"
FRESH_S = 30.0


def table_of(peer: Identity, **kw: Any) -> SessionTable:
    kw.setdefault("trust", TrustStore.open())
    return SessionTable(peer, swarm=SWARM, freshness_s=FRESH_S, **kw)


def handshake(
    requester: Identity, peer: Identity, table: SessionTable
) -> tuple[Offer, wire.SessionWelcome, SessionKeys]:
    offer = Offer(requester, SWARM)
    welcome = table.open(offer.hello, now_ms=wire.unix_ms())
    keys = offer.accept(
        welcome,
        expected_peer_id=peer.peer_id,
        expected_key=peer.public_key,
        now_ms=wire.unix_ms(),
        freshness_s=FRESH_S,
    )
    return offer, welcome, keys


def resigned(msg: Any, signer: Identity, **changes: Any) -> Any:
    unsigned = dataclasses.replace(msg, **changes, signature=b"")
    return dataclasses.replace(unsigned, signature=signer.sign(unsigned.signed_bytes()))


def test_both_ends_derive_the_same_keys_and_macs() -> None:
    requester, peer = Identity.generate(), Identity.generate()
    table = table_of(peer)
    _, welcome, keys = handshake(requester, peer, table)
    held = table.get(welcome.session_id)
    assert held is not None
    assert held.keys == keys
    assert (held.requester_id, held.requester_key) == (requester.peer_id, requester.public_key)
    assert keys.request_key != keys.reply_key
    mac = keys.request_mac("/v1/infer", b"body")
    assert session.macs_equal(held.keys.request_mac("/v1/infer", b"body"), mac)
    # The MAC covers the path, the body, and for a reply its request and status.
    assert keys.request_mac("/v1/infer/batch", b"body") != mac
    assert keys.request_mac("/v1/infer", b"bodY") != mac
    reply = keys.reply_mac(mac, 200, b"r")
    assert reply == held.keys.reply_mac(mac, 200, b"r")
    assert reply not in {keys.reply_mac(mac, 409, b"r"), keys.reply_mac(b"x" * 32, 200, b"r")}


def test_every_session_has_its_own_keys() -> None:
    requester, peer = Identity.generate(), Identity.generate()
    table = table_of(peer)
    first, second = handshake(requester, peer, table)[2], handshake(requester, peer, table)[2]
    assert first.session_id != second.session_id
    assert first.request_key != second.request_key


def test_hello_and_welcome_round_trip_the_wire() -> None:
    requester, peer = Identity.generate(), Identity.generate()
    offer, welcome, _ = handshake(requester, peer, table_of(peer))
    assert wire.decode_hello(wire.encode_hello(offer.hello)) == offer.hello
    assert wire.decode_welcome(wire.encode_welcome(welcome)) == welcome


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"[]", "JSON object"),
        (b'{"version": 1}', "lacks field"),
        (b"x" * 5000, "limit"),
    ],
)
def test_malformed_hello_is_a_decode_error(body: bytes, needle: str) -> None:
    with pytest.raises(DecodeError, match=needle):
        wire.decode_hello(body)


def test_hello_with_a_short_exchange_key_does_not_decode() -> None:
    requester = Identity.generate()
    hello = Offer(requester, SWARM).hello
    text = wire.encode_hello(hello).replace(
        wire.encode_hello(hello).split(b'"exchange_key":"')[1].split(b'"')[0], b"AAAA"
    )
    with pytest.raises(DecodeError, match="exchange_key"):
        wire.decode_hello(text)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"swarm": "other"}, wire.WRONG_SWARM),
        ({"issued_at_ms": 1}, wire.STALE),
        ({"requester_id": "0" * 20}, wire.WRONG_KEY),
        ({"version": 99}, wire.WRONG_VERSION),
    ],
)
def test_peer_refuses_a_bad_hello(change: dict[str, Any], reason: str) -> None:
    requester, peer = Identity.generate(), Identity.generate()
    table = table_of(peer)
    hello = resigned(Offer(requester, SWARM).hello, requester, **change)
    with pytest.raises(VerificationError) as err:
        table.open(hello, now_ms=wire.unix_ms())
    assert err.value.reason == reason
    assert len(table) == 0


def test_peer_refuses_a_forged_or_untrusted_hello() -> None:
    requester, peer, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    forged = resigned(Offer(requester, SWARM).hello, stranger)
    with pytest.raises(VerificationError) as err:
        table_of(peer).open(forged, now_ms=wire.unix_ms())
    assert err.value.reason == wire.BAD_SIGNATURE
    closed = table_of(peer, trust=TrustStore.from_keys([stranger.public_key]))
    with pytest.raises(VerificationError) as err:
        closed.open(Offer(requester, SWARM).hello, now_ms=wire.unix_ms())
    assert err.value.reason == wire.UNTRUSTED_KEY


def test_low_order_exchange_key_is_refused() -> None:
    """An all-zero X25519 key would make the shared secret all zeros, known to anyone."""
    requester, peer = Identity.generate(), Identity.generate()
    hello = resigned(Offer(requester, SWARM).hello, requester, exchange_key=bytes(32))
    with pytest.raises(VerificationError) as err:
        table_of(peer).open(hello, now_ms=wire.unix_ms())
    assert err.value.reason == wire.WRONG_KEY


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"hello_sha256": "0" * 64}, wire.WRONG_BINDING),
        ({"requester_id": "0" * 20}, wire.WRONG_BINDING),
        ({"swarm": "other"}, wire.WRONG_BINDING),
        ({"issued_at_ms": 1}, wire.STALE),
    ],
)
def test_requester_refuses_a_welcome_not_for_its_hello(change: dict[str, Any], reason: str) -> None:
    requester, peer = Identity.generate(), Identity.generate()
    offer = Offer(requester, SWARM)
    welcome = resigned(table_of(peer).open(offer.hello, now_ms=wire.unix_ms()), peer, **change)
    with pytest.raises(VerificationError) as err:
        offer.accept(
            welcome,
            expected_peer_id=peer.peer_id,
            expected_key=peer.public_key,
            now_ms=wire.unix_ms(),
            freshness_s=FRESH_S,
        )
    assert err.value.reason == reason


def test_requester_refuses_a_welcome_from_another_key() -> None:
    """Someone at the peer's address answers with its own key: the welcome is not signed
    by the key the peer announced, so no session is made with it."""
    requester, peer, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    offer = Offer(requester, SWARM)
    welcome = table_of(stranger).open(offer.hello, now_ms=wire.unix_ms())
    for claimed in (welcome, resigned(welcome, stranger, responder_id=peer.peer_id)):
        with pytest.raises(VerificationError) as err:
            offer.accept(
                claimed,
                expected_peer_id=peer.peer_id,
                expected_key=peer.public_key,
                now_ms=wire.unix_ms(),
                freshness_s=FRESH_S,
            )
        assert err.value.reason in (wire.WRONG_KEY, wire.BAD_SIGNATURE)


def test_table_forgets_the_oldest_when_full() -> None:
    requester, peer = Identity.generate(), Identity.generate()
    table = table_of(peer, max_sessions=2)
    ids = [handshake(requester, peer, table)[1].session_id for _ in range(3)]
    assert len(table) == 2
    assert table.get(ids[0]) is None
    assert table.get(ids[1]) is not None
    assert table.get(ids[2]) is not None


def test_table_forgets_expired_sessions() -> None:
    requester, peer = Identity.generate(), Identity.generate()
    clock = [1000.0]
    table = table_of(peer, ttl_s=60, clock=lambda: clock[0])
    first = handshake(requester, peer, table)[1].session_id
    clock[0] += 30
    second = handshake(requester, peer, table)[1].session_id
    assert table.get(first) is not None
    clock[0] += 31  # the first is 61 s old, the second 31 s
    assert table.get(first) is None
    assert table.get(second) is not None
    clock[0] += 60
    handshake(requester, peer, table)  # opening prunes what expired
    assert len(table) == 1


@pytest.mark.parametrize("kw", [{"max_sessions": 0}, {"ttl_s": 0}, {"ttl_s": 10**9}])
def test_table_bounds_are_checked(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"max_sessions|ttl_s"):
        table_of(Identity.generate(), **kw)
