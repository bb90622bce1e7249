"""A link's keys: one signed X25519 exchange, then every message sealed with an AEAD.

1. The requester sends a ``LinkHello``: its identity key and a fresh X25519 key, signed.
   The peer checks it (swarm, family, allow-list, freshness, signature; ``HelloGuard``)
   and answers a ``LinkWelcome``: its own fresh X25519 key and the hello's hash, signed
   with the key it announces in mDNS. The requester checks that against the announced key.
2. Both derive two ChaCha20-Poly1305 keys from the X25519 secret with HKDF-SHA256, bound
   to both signed messages: one for each direction.
3. Every later message is sealed under its direction's key with a counter nonce (0, 1,
   2, ...): confidentiality and integrity, and a replayed, reordered, dropped or forged
   message fails to open, which ends the link.

Forward secrecy: the X25519 keys live only in memory, for one link. A hello opens at
most one link: the peer remembers the hellos it accepted until they are stale, so a
replayed hello costs a lookup, never a session (and its sender could not read one).
"""

from __future__ import annotations

import collections
import hashlib
from typing import Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarm import config
from swarm.crypto.identity import Identity, TrustStore, peer_id_for, verify_signature
from swarm.errors import VerificationError
from swarm.wire import codec
from swarm.wire.messages import HELLO_TAG, WELCOME_TAG, LinkHello, LinkWelcome, unix_ms
from swarm.wire.verify import (
    BAD_SIGNATURE,
    REPLAYED,
    STALE,
    UNTRUSTED_KEY,
    WRONG_BINDING,
    WRONG_FAMILY,
    WRONG_KEY,
    WRONG_SWARM,
)

_KEYS_INFO: Final = b"vswarm/link-keys/v2\n"
_AAD: Final = b"vswarm/link/v2"
TAG_LEN: Final = 16  # ChaCha20-Poly1305's tag (RFC 8439 section 2.8)
# RFC 8439 section 2.8: a (key, nonce) pair must never repeat; a 64-bit counter cannot
# wrap in any link's lifetime, and the remaining nonce bytes are zero.
_MAX_COUNTER: Final = 2**64 - 1


class SealError(VerificationError):
    """A sealed message did not open: forged, replayed, reordered or after one lost."""


class Sealer:
    """One direction of a link: seals (or opens) its messages in order."""

    __slots__ = ("_aead", "_counter")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        counter = self._counter
        if counter >= _MAX_COUNTER:
            raise SealError("exhausted", "this link sealed 2**64 messages; open another")
        self._counter = counter + 1
        return counter.to_bytes(12, "little")

    def seal(self, plaintext: bytes) -> bytes:
        """``plaintext`` encrypted and authenticated as this direction's next message."""
        return self._aead.encrypt(self._nonce(), plaintext, _AAD)

    def open(self, sealed: bytes) -> bytes:
        """The next message of this direction; ``SealError`` if it is not exactly that."""
        try:
            return self._aead.decrypt(self._nonce(), sealed, _AAD)
        except (InvalidTag, ValueError, TypeError):
            raise SealError(
                BAD_SIGNATURE, "a sealed message did not open (forged, replayed or out of order)"
            ) from None


def _derive(
    private: X25519PrivateKey, their_key: bytes, hello: LinkHello, welcome_body: bytes
) -> tuple[bytes, bytes]:
    """(requester-to-peer key, peer-to-requester key)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(their_key))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise VerificationError(WRONG_KEY, f"the link's exchange key is unusable: {exc}") from exc
    info = (
        _KEYS_INFO
        + hashlib.sha256(hello.signed_bytes()).digest()
        + hashlib.sha256(WELCOME_TAG + welcome_body).digest()
    )
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=info).derive(shared)
    return okm[:32], okm[32:]


# --- the requester's end ----------------------------------------------------------------


class Offer:
    """A requester's hello and the private key behind it, until the welcome comes."""

    __slots__ = ("_private", "hello")

    def __init__(self, identity: Identity, *, swarm: str, family: str) -> None:
        self._private = X25519PrivateKey.generate()
        exchange_key = self._private.public_key().public_bytes_raw()
        issued = unix_ms()
        body = codec.hello_body(
            swarm=swarm,
            family=family,
            requester_id=identity.peer_id,
            requester_key=identity.public_key,
            exchange_key=exchange_key,
            issued_at_ms=issued,
        )
        self.hello = LinkHello(
            swarm=swarm,
            family=family,
            requester_id=identity.peer_id,
            requester_key=identity.public_key,
            exchange_key=exchange_key,
            issued_at_ms=issued,
            body=body,
            signature=identity.sign(HELLO_TAG + body),
        )

    def accept(
        self,
        welcome: LinkWelcome,
        *,
        expected_peer_id: str,
        expected_key: bytes,
        now_ms: int,
        freshness_s: float,
    ) -> tuple[Sealer, Sealer]:
        """(what we send, what we receive), once ``welcome`` is checked: from the peer we
        asked, signed with the key it announced, answering this hello."""
        if peer_id_for(expected_key) != expected_peer_id:
            _reject(WRONG_KEY, f"the key announced by {expected_peer_id} is not its own")
        if welcome.responder_id != expected_peer_id:
            _reject(WRONG_KEY, f"welcome from {welcome.responder_id}, asked {expected_peer_id}")
        if not verify_signature(expected_key, welcome.signature, welcome.signed_bytes()):
            _reject(BAD_SIGNATURE, "the link welcome's signature does not verify")
        hello = self.hello
        if welcome.requester_id != hello.requester_id:
            _reject(WRONG_BINDING, "the welcome answers another requester")
        if welcome.hello_sha256 != hashlib.sha256(hello.signed_bytes()).digest():
            _reject(WRONG_BINDING, "the welcome answers another hello")
        _check_fresh(welcome.issued_at_ms, now_ms, freshness_s)
        out_key, in_key = _derive(self._private, welcome.exchange_key, hello, welcome.body)
        return Sealer(out_key), Sealer(in_key)


# --- the peer's end ---------------------------------------------------------------------


class HelloGuard:
    """A peer's checks of hellos, and the hellos it accepted until they are stale.

    Cheap checks come first and the signature last, and a hello is remembered only once
    it passed, so a forged copy cannot block the genuine one; a replayed hello is refused
    by a lookup. The memory is bounded (``max_entries``): past it, the oldest goes first.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        swarm: str,
        family: str,
        trust: TrustStore,
        freshness_s: float,
        max_asks: int,
        max_entries: int = config.MAX_SEEN_HELLOS,
    ) -> None:
        self._identity = identity
        self._swarm = swarm
        self._family = family
        self._trust = trust
        self._freshness_s = freshness_s
        self._max_asks = max_asks
        self._max_entries = max_entries
        self._seen: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def accept(self, hello: LinkHello, *, now_ms: int) -> tuple[LinkWelcome, Sealer, Sealer]:
        """Check ``hello`` and open its link: the welcome to send back, then (what we
        send, what we receive). ``VerificationError`` says what is wrong with the hello."""
        if hello.swarm != self._swarm:
            _reject(WRONG_SWARM, f"hello for swarm {hello.swarm!r}; this peer: {self._swarm!r}")
        if hello.family != self._family:
            _reject(
                WRONG_FAMILY,
                f"hello for family {hello.family}; this peer serves family {self._family}",
            )
        if hello.requester_id != peer_id_for(hello.requester_key):
            _reject(WRONG_KEY, "requester_id is not derived from requester_key")
        if not self._trust.allows(hello.requester_key):
            _reject(UNTRUSTED_KEY, f"requester {hello.requester_id} is not on the allow-list")
        _check_fresh(hello.issued_at_ms, now_ms, self._freshness_s)
        digest = hashlib.sha256(hello.signed_bytes()).digest()
        self._prune(now_ms)
        if digest in self._seen:
            _reject(REPLAYED, "this hello opened a link already")
        if not verify_signature(hello.requester_key, hello.signature, hello.signed_bytes()):
            _reject(BAD_SIGNATURE, "the link hello's signature does not verify")
        while len(self._seen) >= self._max_entries:
            self._seen.popitem(last=False)
        self._seen[digest] = hello.issued_at_ms + round(self._freshness_s * 1000)
        private = X25519PrivateKey.generate()
        identity = self._identity
        exchange_key = private.public_key().public_bytes_raw()
        body = codec.welcome_body(
            responder_id=identity.peer_id,
            requester_id=hello.requester_id,
            hello_sha256=digest,
            exchange_key=exchange_key,
            max_asks=self._max_asks,
            issued_at_ms=now_ms,
        )
        welcome = LinkWelcome(
            responder_id=identity.peer_id,
            requester_id=hello.requester_id,
            hello_sha256=digest,
            exchange_key=exchange_key,
            max_asks=self._max_asks,
            issued_at_ms=now_ms,
            body=body,
            signature=identity.sign(WELCOME_TAG + body),
        )
        in_key, out_key = _derive(private, hello.exchange_key, hello, body)
        return welcome, Sealer(out_key), Sealer(in_key)

    def _prune(self, now_ms: int) -> None:
        # Accepted in time order, so they go stale in order too (issued times of a
        # fresh hello differ by at most the freshness window: near enough).
        while self._seen:
            first = next(iter(self._seen.values()))
            if first > now_ms:
                return
            self._seen.popitem(last=False)


def _check_fresh(issued_at_ms: int, now_ms: int, freshness_s: float) -> None:
    freshness_ms = round(freshness_s * 1000)
    if abs(now_ms - issued_at_ms) > freshness_ms:
        _reject(STALE, f"issued {now_ms - issued_at_ms} ms ago; limit {freshness_ms} ms")


def _reject(reason: str, detail: str) -> NoReturn:
    raise VerificationError(reason, detail)


__all__ = ["TAG_LEN", "HelloGuard", "Offer", "SealError", "Sealer"]
