"""Checks on decoded replies that decoding cannot make.

``verify_reply`` checks the binding of a reply to its request, the peer and model it
came from, freshness and its top-k; ``verify_reply_batch`` the signature that covers a
group of replies. They raise ``VerificationError`` whose ``reason`` is one of
``REJECT_REASONS``. (Requests need no such checks: the link they travel on proves who
sent them, and its sealing refuses a replayed one.)
"""

from __future__ import annotations

import itertools
from typing import Final, NoReturn

from swarm import config
from swarm.crypto.identity import TrustStore, peer_id_for, verify_signature
from swarm.errors import VerificationError
from swarm.wire.messages import PPM, InferReply, InferRequest, ReplyBatch

# Each top-k entry is rounded to the nearest ppm (error <= 0.5), so an honest top-k of
# probabilities summing to at most 1 never exceeds PPM + k/2.
TOPK_SUM_SLACK_PPM: Final = config.MAX_TOP_K

# Rejection reasons (VerificationError.reason).
WRONG_SWARM: Final = "wrong_swarm"
WRONG_FAMILY: Final = "wrong_family"
BAD_SIGNATURE: Final = "bad_signature"
WRONG_KEY: Final = "wrong_key"
UNTRUSTED_KEY: Final = "untrusted_key"
STALE: Final = "stale"
REPLAYED: Final = "replayed"
WRONG_PEER: Final = "wrong_peer"
WRONG_BINDING: Final = "wrong_binding"
WRONG_VARIANT: Final = "wrong_variant"
BAD_TOPK: Final = "bad_topk"
REJECT_REASONS: Final = (
    WRONG_SWARM,
    WRONG_FAMILY,
    BAD_SIGNATURE,
    WRONG_KEY,
    UNTRUSTED_KEY,
    STALE,
    REPLAYED,
    WRONG_PEER,
    WRONG_BINDING,
    WRONG_VARIANT,
    BAD_TOPK,
)
# verify_reply checks the signature before these, so a reply rejected for one of them
# was provably signed by its peer: evidence against that peer, not against the network.
ATTRIBUTABLE_REPLY_REASONS: Final = (WRONG_BINDING, WRONG_VARIANT, STALE, BAD_TOPK)


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
    num_classes: int = config.NUM_CLASSES,
) -> None:
    """Accept ``reply`` to ``request`` from the peer we asked, or raise ``VerificationError``.

    ``expected_key`` is the key that peer announced. The signature is its batch's
    (``verify_reply_batch``), checked by the caller: every check here concerns signed
    content (see ``ATTRIBUTABLE_REPLY_REASONS``) once that signature holds.
    """
    if peer_id_for(expected_key) != expected_peer_id or not trust.allows(expected_key):
        _reject(WRONG_KEY, f"the key announced by {expected_peer_id} is not its own or not trusted")
    if reply.responder_id != expected_peer_id:
        _reject(WRONG_PEER, f"reply from {reply.responder_id}, asked {expected_peer_id}")
    for name, got, want in (
        ("swarm", reply.swarm, request.swarm),
        ("family", reply.family, request.family),
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
    _check_topk(reply.topk, request.k, num_classes)


def verify_reply_batch(batch: ReplyBatch, *, expected_key: bytes) -> None:
    """Raise ``VerificationError`` (bad_signature) unless ``expected_key`` signed the
    replies of ``batch``; its replies are checked one by one with ``verify_reply``."""
    if not verify_signature(expected_key, batch.signature, batch.signed_bytes()):
        _reject(BAD_SIGNATURE, "the reply batch signature does not verify")


def _check_topk(topk: tuple[tuple[int, int], ...], k: int, num_classes: int) -> None:
    if not 1 <= len(topk) <= k:
        _reject(BAD_TOPK, f"{len(topk)} entries; the request asked for at most {k}")
    classes = [cls for cls, _ in topk]
    if len(set(classes)) != len(classes):
        _reject(BAD_TOPK, "a class appears twice")
    if not all(0 <= cls < num_classes and 0 <= ppm <= PPM for cls, ppm in topk):
        _reject(BAD_TOPK, "a class or probability is out of range")
    if any(a[1] < b[1] for a, b in itertools.pairwise(topk)):
        _reject(BAD_TOPK, "entries are not sorted by probability, highest first")
    total = sum(ppm for _, ppm in topk)
    if total > PPM + TOPK_SUM_SLACK_PPM:
        _reject(BAD_TOPK, f"probabilities sum to {total} ppm, more than 1")


def _reject(reason: str, detail: str) -> NoReturn:
    raise VerificationError(reason, detail)
