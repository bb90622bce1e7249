"""Sessions: one signed key exchange between a requester and a peer, then a MAC per call.

An Ed25519 signature costs about 40 us to make and 120 us to check on a small board,
which is more than a light variant's inference; a call to five peers checks six. A
session pays for signatures once per requester and peer:

1. ``POST /v1/session``: the requester sends a ``SessionHello`` (its identity key and a
   fresh X25519 key, signed); the peer checks it as it checks a request (swarm, allow-list,
   freshness, signature) and answers a ``SessionWelcome`` (its own fresh X25519 key, the
   hello's hash, a session id and lifetime, signed with the key it announces in mDNS).
2. Both derive two keys from the X25519 secret with HKDF-SHA256, bound to the hello, the
   session id and both peer ids: one for what the requester sends, one for the replies.
3. Each later exchange carries the session id and an HMAC-SHA256 in two HTTP headers
   (``Vswarm-Session``, ``Vswarm-Mac``) over the exact body. The request MAC covers the
   path too; the reply MAC covers the request MAC (so a reply answers that one request),
   the status and the body. The peer checks the request MAC instead of the request's
   signature, then runs every other check of ``verify_request`` (freshness, replays,
   the input hash). The requester checks the reply MAC before it reads the body. A call
   whose every peer holds a live session, and a batch sent in one, carry a zero signature:
   the MAC authenticates them, and no one would check it.

Replies are still signed: a signature is evidence a third party can check, a MAC is
not. Because the MAC proves which peer sent a reply, the requester checks the signature
only where it matters: every reply that dissents from the decision is checked before the
answer is returned (a bad one is dropped and counts against its peer, who provably sent
it), and a sample of the others after (``config.LATE_SIGNATURE_SAMPLE``).

Forward secrecy: the X25519 keys live only in memory, for one session. A peer that
restarts forgets its sessions; the requester sees ``unknown_session`` and opens another.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Final, NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from swarm import PROTOCOL_VERSION, config
from swarm.crypto.identity import Identity, TrustStore, peer_id_for, verify_signature
from swarm.errors import VerificationError
from swarm.wire.messages import (
    SessionHello,
    SessionWelcome,
    build_hello,
    build_welcome,
)
from swarm.wire.verify import (
    BAD_SIGNATURE,
    STALE,
    UNTRUSTED_KEY,
    WRONG_BINDING,
    WRONG_KEY,
    WRONG_SWARM,
    WRONG_VERSION,
)

SESSION_PATH: Final = "/v1/session"
SESSION_HEADER: Final = "Vswarm-Session"
MAC_HEADER: Final = "Vswarm-Mac"
# The error code of a request naming a session the peer does not hold (any more).
UNKNOWN_SESSION: Final = "unknown_session"
MAC_LEN: Final = 32
_KEYS_INFO: Final = b"vswarm/session-keys/v1\n"
_REQUEST_MAC_TAG: Final = b"vswarm/request-mac/v1\n"
_REPLY_MAC_TAG: Final = b"vswarm/reply-mac/v1\n"


@dataclasses.dataclass(frozen=True, slots=True)
class SessionKeys:
    """One session's id and its two MAC keys, as both ends derive them."""

    session_id: str
    request_key: bytes = dataclasses.field(repr=False)
    reply_key: bytes = dataclasses.field(repr=False)

    def request_mac(self, path: str, body: bytes) -> bytes:
        """The MAC of a request body sent to ``path``."""
        return hmac.digest(
            self.request_key, _REQUEST_MAC_TAG + path.encode() + b"\n" + body, "sha256"
        )

    def reply_mac(self, request_mac: bytes, status: int, body: bytes) -> bytes:
        """The MAC of the reply (``status``, ``body``) to the request that had ``request_mac``."""
        head = _REPLY_MAC_TAG + request_mac + status.to_bytes(2, "big")
        return hmac.digest(self.reply_key, head + body, "sha256")


def macs_equal(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison of two MACs."""
    return hmac.compare_digest(expected, got)


def derive_keys(
    private: X25519PrivateKey,
    their_exchange_key: bytes,
    hello: SessionHello,
    welcome: SessionWelcome,
) -> SessionKeys:
    """The session's keys from our X25519 key and theirs; ``VerificationError`` if theirs
    is not a usable X25519 key (a low-order point gives an all-zero secret)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(their_exchange_key))
    except ValueError as exc:
        detail = f"the session's exchange key is unusable: {exc}"
        raise VerificationError(WRONG_KEY, detail) from exc
    info = (
        _KEYS_INFO
        + hashlib.sha256(hello.signed_bytes()).digest()
        + welcome.session_id.encode()
        + hello.requester_id.encode()
        + welcome.responder_id.encode()
    )
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=info).derive(shared)
    return SessionKeys(welcome.session_id, okm[:32], okm[32:])


# --- the requester's end ----------------------------------------------------------------


class Offer:
    """A requester's hello and the private key behind it, until the welcome comes."""

    __slots__ = ("_private", "hello")

    def __init__(self, identity: Identity, swarm: str) -> None:
        self._private = X25519PrivateKey.generate()
        public = self._private.public_key().public_bytes_raw()
        self.hello = build_hello(identity, swarm=swarm, exchange_key=public)

    def accept(
        self,
        welcome: SessionWelcome,
        *,
        expected_peer_id: str,
        expected_key: bytes,
        now_ms: int,
        freshness_s: float,
    ) -> SessionKeys:
        """The session's keys, once ``welcome`` is checked: from the peer we asked, signed
        with the key it announced, answering this hello; else ``VerificationError``."""
        hello = self.hello
        if peer_id_for(expected_key) != expected_peer_id:
            _reject(WRONG_KEY, f"the key announced by {expected_peer_id} is not its own")
        if welcome.responder_id != expected_peer_id:
            _reject(WRONG_KEY, f"welcome from {welcome.responder_id}, asked {expected_peer_id}")
        if not verify_signature(expected_key, welcome.signature, welcome.signed_bytes()):
            _reject(BAD_SIGNATURE, "the session welcome signature does not verify")
        hello_sha = hashlib.sha256(hello.signed_bytes()).hexdigest()
        for name, got, want in (
            ("version", welcome.version, hello.version),
            ("swarm", welcome.swarm, hello.swarm),
            ("requester_id", welcome.requester_id, hello.requester_id),
            ("hello_sha256", welcome.hello_sha256, hello_sha),
        ):
            if got != want:
                _reject(WRONG_BINDING, f"welcome {name} is {got!r}, the hello has {want!r}")
        _check_fresh(welcome.issued_at_ms, now_ms, freshness_s)
        return derive_keys(self._private, welcome.exchange_key, hello, welcome)


# --- the peer's end -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PeerSession:
    """A session a peer holds: whose it is, its keys, until when (the table's clock)."""

    requester_id: str
    requester_key: bytes = dataclasses.field(repr=False)
    keys: SessionKeys
    expires_at: float


class SessionTable:
    """The sessions one peer holds, at most ``max_sessions``, each for ``ttl_s``.

    A full table forgets its oldest session first: its requester gets ``unknown_session``
    on its next call and opens a new one, so a flood of hellos costs other requesters a
    round trip, never a wrong answer.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        swarm: str,
        trust: TrustStore,
        freshness_s: float,
        ttl_s: float = config.SESSION_TTL_S,
        max_sessions: int = config.MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be positive, got {max_sessions}")
        if not 0 < ttl_s * 1000 <= config.MAX_SESSION_TTL_MS:
            raise ValueError(f"ttl_s must be in (0, {config.MAX_SESSION_TTL_MS / 1000}]")
        self._identity = identity
        self._swarm = swarm
        self._trust = trust
        self._freshness_s = freshness_s
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: collections.OrderedDict[str, PeerSession] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __repr__(self) -> str:
        return f"SessionTable(sessions={len(self._sessions)}, max={self._max})"

    def open(self, hello: SessionHello, *, now_ms: int) -> SessionWelcome:
        """Check ``hello`` as a request is checked and open its session; the welcome to
        send back. ``VerificationError`` says what is wrong with the hello."""
        if hello.version != PROTOCOL_VERSION:
            _reject(WRONG_VERSION, f"version {hello.version}, this peer speaks {PROTOCOL_VERSION}")
        if hello.swarm != self._swarm:
            _reject(WRONG_SWARM, f"hello for swarm {hello.swarm!r}; this peer: {self._swarm!r}")
        if hello.requester_id != peer_id_for(hello.requester_key):
            _reject(WRONG_KEY, "requester_id is not derived from requester_key")
        if not self._trust.allows(hello.requester_key):
            _reject(UNTRUSTED_KEY, f"requester {hello.requester_id} is not on the allow-list")
        _check_fresh(hello.issued_at_ms, now_ms, self._freshness_s)
        if not verify_signature(hello.requester_key, hello.signature, hello.signed_bytes()):
            _reject(BAD_SIGNATURE, "the session hello signature does not verify")
        private = X25519PrivateKey.generate()
        welcome = build_welcome(
            self._identity,
            hello,
            session_id=secrets.token_hex(16),
            exchange_key=private.public_key().public_bytes_raw(),
            ttl_ms=round(self._ttl_s * 1000),
            now_ms=now_ms,
        )
        keys = derive_keys(private, hello.exchange_key, hello, welcome)
        now = self._clock()
        self._prune(now)
        while len(self._sessions) >= self._max:
            self._sessions.popitem(last=False)
        self._sessions[keys.session_id] = PeerSession(
            hello.requester_id, hello.requester_key, keys, now + self._ttl_s
        )
        return welcome

    def get(self, session_id: str) -> PeerSession | None:
        """The live session ``session_id``, or None if unknown or expired."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._sessions[session_id]
            return None
        return session

    def _prune(self, now: float) -> None:
        # Sessions are kept in the order they were opened, so expiries are in order too.
        while self._sessions:
            first = next(iter(self._sessions.values()))
            if first.expires_at > now:
                return
            self._sessions.popitem(last=False)


def _check_fresh(issued_at_ms: int, now_ms: int, freshness_s: float) -> None:
    freshness_ms = round(freshness_s * 1000)
    if abs(now_ms - issued_at_ms) > freshness_ms:
        _reject(STALE, f"issued {now_ms - issued_at_ms} ms ago; limit {freshness_ms} ms")


def _reject(reason: str, detail: str) -> NoReturn:
    raise VerificationError(reason, detail)


__all__ = [
    "MAC_HEADER",
    "MAC_LEN",
    "SESSION_HEADER",
    "SESSION_PATH",
    "UNKNOWN_SESSION",
    "Offer",
    "PeerSession",
    "SessionKeys",
    "SessionTable",
    "derive_keys",
    "macs_equal",
]
