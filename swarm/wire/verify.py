"""Checks on decoded messages that decoding cannot make.

``verify_request`` and ``verify_reply`` check signatures, keys, the binding of a reply
to its request, freshness and replays. They raise ``VerificationError`` whose
``reason`` is one of ``REJECT_REASONS``.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Final, NoReturn

from swarm import PROTOCOL_VERSION, config
from swarm.crypto.identity import TrustStore, peer_id_for, verify_signature
from swarm.errors import VerificationError
from swarm.wire.messages import PPM, InferReply, InferRequest, ReplyBatch, input_sha256

# Each top-k entry is rounded to the nearest ppm (error <= 0.5), so an honest top-k of
# probabilities summing to at most 1 never exceeds PPM + k/2.
TOPK_SUM_SLACK_PPM: Final = config.MAX_TOP_K

# Rejection reasons (VerificationError.reason).
WRONG_VERSION: Final = "wrong_version"
WRONG_SWARM: Final = "wrong_swarm"
BAD_SIGNATURE: Final = "bad_signature"
WRONG_KEY: Final = "wrong_key"
UNTRUSTED_KEY: Final = "untrusted_key"
STALE: Final = "stale"
REPLAYED: Final = "replayed"
INPUT_MISMATCH: Final = "input_mismatch"
WRONG_PEER: Final = "wrong_peer"
WRONG_BINDING: Final = "wrong_binding"
WRONG_VARIANT: Final = "wrong_variant"
BAD_TOPK: Final = "bad_topk"
REJECT_REASONS: Final = (
    WRONG_VERSION,
    WRONG_SWARM,
    BAD_SIGNATURE,
    WRONG_KEY,
    UNTRUSTED_KEY,
    STALE,
    REPLAYED,
    INPUT_MISMATCH,
    WRONG_PEER,
    WRONG_BINDING,
    WRONG_VARIANT,
    BAD_TOPK,
)
# verify_reply checks the signature before these, so a reply rejected for one of them
# was provably signed by its peer: evidence against that peer, not against the network.
ATTRIBUTABLE_REPLY_REASONS: Final = (WRONG_BINDING, WRONG_VARIANT, STALE, BAD_TOPK)


class ReplayCache:
    """The (requester, request id) pairs already served, until they could be fresh again.

    An entry is kept until its request would be stale anyway (issued_at + freshness), and
    the table holds at most ``max_entries``: past that, the oldest entry is dropped first
    (a replay of it then costs one more inference, never a wrong answer).
    """

    __slots__ = ("_entries", "_max_entries")

    def __init__(self, max_entries: int = config.MAX_SEEN_REQUEST_IDS) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, requester_id: str, request_id: str, *, now_ms: int) -> bool:
        """True if this request was accepted before and has not expired."""
        expires = self._entries.get((requester_id, request_id))
        return expires is not None and expires > now_ms

    def add(self, requester_id: str, request_id: str, *, expires_at_ms: int, now_ms: int) -> None:
        """Remember a request until ``expires_at_ms``; prune what expired."""
        while self._entries:
            key, expires = next(iter(self._entries.items()))
            if expires > now_ms and len(self._entries) < self._max_entries:
                break
            del self._entries[key]
        self._entries[(requester_id, request_id)] = expires_at_ms

    def __repr__(self) -> str:
        return f"ReplayCache(entries={len(self._entries)}, max={self._max_entries})"


def verify_request(
    req: InferRequest,
    *,
    swarm: str,
    trust: TrustStore,
    now_ms: int,
    freshness_s: float,
    seen: ReplayCache,
    signature_verified: bool = False,
) -> None:
    """Accept ``req`` or raise ``VerificationError``; an accepted request is remembered.

    Cheap checks come first, the signature next, and the request is added to ``seen``
    only once everything passed, so a forged copy cannot block the genuine one. With
    ``signature_verified`` the caller has checked a signature covering ``req`` already
    (the batch it came in, ``swarm.wire.messages``) and its own is not checked.
    """
    if req.version != PROTOCOL_VERSION:
        _reject(WRONG_VERSION, f"version {req.version}, this peer speaks {PROTOCOL_VERSION}")
    if req.swarm != swarm:
        _reject(WRONG_SWARM, f"request for swarm {req.swarm!r}, this peer is in {swarm!r}")
    if req.requester_id != peer_id_for(req.requester_key):
        _reject(WRONG_KEY, "requester_id is not derived from requester_key")
    if not trust.allows(req.requester_key):
        _reject(UNTRUSTED_KEY, f"requester {req.requester_id} is not on the allow-list")
    freshness_ms = round(freshness_s * 1000)
    if abs(now_ms - req.issued_at_ms) > freshness_ms:
        _reject(STALE, f"issued {now_ms - req.issued_at_ms} ms ago; limit {freshness_ms} ms")
    if seen.seen(req.requester_id, req.request_id, now_ms=now_ms):
        _reject(REPLAYED, f"request {req.request_id} was already served")
    if not signature_verified and not verify_signature(
        req.requester_key, req.signature, req.signed_bytes()
    ):
        _reject(BAD_SIGNATURE, "the request signature does not verify")
    if input_sha256(req.input) != req.input_sha256:
        _reject(INPUT_MISMATCH, "sha256 of input differs from input_sha256")
    seen.add(
        req.requester_id,
        req.request_id,
        expires_at_ms=req.issued_at_ms + freshness_ms,
        now_ms=now_ms,
    )


def verify_reply(
    reply: InferReply,
    *,
    request: InferRequest,
    expected_peer_id: str,
    expected_key: bytes,
    trust: TrustStore,
    now_ms: int,
    freshness_s: float,
    expected_variant: str | None = None,
    expected_model_sha256: str | None = None,
    signature_verified: bool = False,
) -> None:
    """Accept ``reply`` to ``request`` from the peer we asked, or raise ``VerificationError``.

    ``expected_key`` is the key that peer announced; every check after the signature
    concerns signed content (see ``ATTRIBUTABLE_REPLY_REASONS``). With
    ``signature_verified`` the caller has checked the signature of the batch ``reply``
    came in, against the same key, and the reply's own (absent) one is not checked.
    """
    if peer_id_for(expected_key) != expected_peer_id or not trust.allows(expected_key):
        _reject(WRONG_KEY, f"the key announced by {expected_peer_id} is not its own or not trusted")
    if reply.responder_id != expected_peer_id:
        _reject(WRONG_PEER, f"reply from {reply.responder_id}, asked {expected_peer_id}")
    if not signature_verified and not verify_signature(
        expected_key, reply.signature, reply.signed_bytes()
    ):
        _reject(BAD_SIGNATURE, "the reply signature does not verify")
    for name, got, want in (
        ("version", reply.version, request.version),
        ("swarm", reply.swarm, request.swarm),
        ("request_id", reply.request_id, request.request_id),
        ("requester_id", reply.requester_id, request.requester_id),
        ("input_sha256", reply.input_sha256, request.input_sha256),
    ):
        if got != want:
            _reject(WRONG_BINDING, f"{name} is {got!r}, the request has {want!r}")
    if expected_variant is not None and reply.variant != expected_variant:
        _reject(WRONG_VARIANT, f"variant {reply.variant!r}, announced {expected_variant!r}")
    if expected_model_sha256 is not None and reply.model_sha256 != expected_model_sha256:
        _reject(WRONG_VARIANT, "model_sha256 differs from the announced one")
    freshness_ms = round(freshness_s * 1000)
    if abs(now_ms - reply.issued_at_ms) > freshness_ms:
        _reject(STALE, f"issued {now_ms - reply.issued_at_ms} ms ago; limit {freshness_ms} ms")
    _check_topk(reply.topk, request.k)


def verify_reply_signature(reply: InferReply, key: bytes) -> None:
    """Raise ``VerificationError`` (bad_signature) unless ``key`` signed ``reply``."""
    if not verify_signature(key, reply.signature, reply.signed_bytes()):
        _reject(BAD_SIGNATURE, "the reply signature does not verify")


def verify_reply_batch(
    batch: ReplyBatch, *, expected_peer_id: str, expected_key: bytes, check_signature: bool = True
) -> None:
    """Accept the envelope of a reply batch from the peer we asked, or raise
    ``VerificationError``; its replies are then checked one by one with ``verify_reply``
    and ``signature_verified=True``. Without ``check_signature`` (a session MAC proved
    the sender) the signature is left for later."""
    if batch.responder_id != expected_peer_id:
        _reject(WRONG_PEER, f"reply batch from {batch.responder_id}, asked {expected_peer_id}")
    if check_signature and not verify_signature(
        expected_key, batch.signature, batch.signed_bytes()
    ):
        _reject(BAD_SIGNATURE, "the reply batch signature does not verify")


def _check_topk(topk: tuple[tuple[int, int], ...], k: int) -> None:
    if not 1 <= len(topk) <= k:
        _reject(BAD_TOPK, f"{len(topk)} entries; the request asked for at most {k}")
    classes = [cls for cls, _ in topk]
    if len(set(classes)) != len(classes):
        _reject(BAD_TOPK, "a class appears twice")
    if not all(0 <= cls < config.NUM_CLASSES and 0 <= ppm <= PPM for cls, ppm in topk):
        _reject(BAD_TOPK, "a class or probability is out of range")
    if any(a[1] < b[1] for a, b in itertools.pairwise(topk)):
        _reject(BAD_TOPK, "entries are not sorted by probability, highest first")
    total = sum(ppm for _, ppm in topk)
    if total > PPM + TOPK_SUM_SLACK_PPM:
        _reject(BAD_TOPK, f"probabilities sum to {total} ppm, more than 1")


def _reject(reason: str, detail: str) -> NoReturn:
    raise VerificationError(reason, detail)
