"""Wire messages of the peer links and the exact bytes their signatures cover.

A requester and a peer talk over one link (``swarm.link``): a signed hello and welcome
open it, every later message is sealed (``swarm.crypto.session``). Messages are msgpack
arrays with fixed, versioned layouts (``swarm.wire.codec``):

- ``LinkHello`` / ``LinkWelcome``: the requester's and the peer's signed X25519 keys.
- ``Asks``: one or more requests (``InferRequest``), each with its input once, compact
  (the family's uint8 pixels, C x H x W).
- ``Answers``: per ask, a reply or an error; the replies are signed once for the group.

A reply's signature is Ed25519 over a domain tag and the exact encoded bytes of the
replies, never over a re-encoding: the peer encodes each reply once (``InferReply.raw``)
and signs ::

    b"vswarm/reply-batch/v2\\n" + sha256(b"vswarm/reply/v2\\n" + raw) + ...   (in order)

so any one reply, with its siblings' digests and the signature, is evidence a third party
can check against the peer's public key. Hello and welcome are signed the same way over
their encoded bodies, under tags of their own, so no signature made for one kind of message
verifies as another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import secrets
import time
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from swarm import config

REPLY_TAG: Final = b"vswarm/reply/v2\n"
BATCH_REPLY_TAG: Final = b"vswarm/reply-batch/v2\n"
HELLO_TAG: Final = b"vswarm/link-hello/v2\n"
WELCOME_TAG: Final = b"vswarm/link-welcome/v2\n"

PPM: Final = 1_000_000
# A request's time budget; anything longer is a mistake or an attempt to pin a worker.
MAX_DEADLINE_MS: Final = 60_000
REQUEST_ID_LEN: Final = 16  # bytes on the wire, 32 hex characters in memory
SHA256_LEN: Final = 32

HEX_ID: Final = re.compile(r"[0-9a-f]{32}")
# Swarm and variant names: the rule discovery announces them under (at most one DNS
# label, RFC 1035 section 2.3.4), safe in TXT records, logs and file names.
NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


# Each pixel's model value, pixel / 255 in float32: one lookup converts an input.
_PIXEL_VALUES: Final = np.arange(256, dtype=np.float32) / np.float32(255.0)


def unix_ms() -> int:
    """The wall clock in unix milliseconds, the time base of ``issued_at_ms``."""
    return time.time_ns() // 1_000_000


def is_valid_name(name: str) -> bool:
    """True if ``name`` can be a swarm or variant name (1-63 of ``A-Za-z0-9._-``)."""
    return isinstance(name, str) and NAME.fullmatch(name) is not None


def input_sha256(raw: bytes) -> str:
    """Hex sha256 of an input's compact bytes."""
    return hashlib.sha256(raw).hexdigest()


# --- requests ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class InferRequest:
    """One input to classify, as its requester asks it of every peer.

    On a link it travels as its id, ``k``, deadline and compact input; the rest is the
    link's (swarm, family, requester) or derived (``input_sha256``), and binds the replies.
    """

    swarm: str
    family: str  # the family id (``Manifest.family_id``)
    request_id: str  # 32 lowercase hex characters, random
    requester_id: str
    input: bytes = dataclasses.field(repr=False)  # uint8 pixels, C x H x W, C order
    input_shape: tuple[int, int, int]
    input_sha256: str
    k: int
    deadline_ms: int  # the budget the requester gives this request, from receipt

    def tensor(self) -> npt.NDArray[np.float32]:
        """The model input: float32 C x H x W in [0, 1] (pixel / 255)."""
        return _PIXEL_VALUES[np.frombuffer(self.input, dtype=np.uint8)].reshape(self.input_shape)


def pixels_from(tensor: npt.ArrayLike, shape: tuple[int, int, int]) -> bytes:
    """The compact input of ``tensor``: uint8 pixels of ``shape``, or float32 in [0, 1]
    (pixel / 255, rounded to the nearest pixel); ``ValueError`` if it is neither."""
    arr = np.asarray(tensor)
    if arr.shape != shape:
        raise ValueError(f"an input has shape {shape} (channels, height, width), got {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr).tobytes()
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"an input holds uint8 pixels or floats in [0, 1], got dtype {arr.dtype}")
    # NaN fails both comparisons, infinities one: two reductions check all three rules.
    if not (float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0):
        raise ValueError("a float input holds finite values in [0, 1] (pixel / 255)")
    return np.rint(arr * 255.0).astype(np.uint8).tobytes()


def build_request(
    *,
    swarm: str,
    family: str,
    requester_id: str,
    tensor: npt.ArrayLike,
    shape: tuple[int, int, int] = config.INPUT_SHAPE,
    k: int = config.DEFAULT_TOP_K,
    deadline_ms: int,
    request_id: str | None = None,
) -> InferRequest:
    """A request for ``tensor`` (uint8 pixels or floats in [0, 1] of ``shape``)."""
    if not is_valid_name(swarm):
        raise ValueError(f"invalid swarm name {swarm!r}: use 1-63 of A-Za-z0-9._-")
    if HEX_ID.fullmatch(family) is None:
        raise ValueError(f"family must be 32 lowercase hex characters, got {family!r}")
    if not 1 <= k <= config.MAX_TOP_K:
        raise ValueError(f"k must be in [1, {config.MAX_TOP_K}], got {k}")
    if not 1 <= deadline_ms <= MAX_DEADLINE_MS:
        raise ValueError(f"deadline_ms must be in [1, {MAX_DEADLINE_MS}], got {deadline_ms}")
    rid = secrets.token_hex(REQUEST_ID_LEN) if request_id is None else request_id
    if HEX_ID.fullmatch(rid) is None:
        raise ValueError(f"request_id must be 32 lowercase hex characters, got {rid!r}")
    raw = pixels_from(tensor, shape)
    return InferRequest(
        swarm=swarm,
        family=family,
        request_id=rid,
        requester_id=requester_id,
        input=raw,
        input_shape=shape,
        input_sha256=input_sha256(raw),
        k=k,
        deadline_ms=deadline_ms,
    )


# --- replies ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class InferReply:
    """A peer's top-k answer to one request; ``raw`` is its exact encoded bytes, which
    the signature of its ``ReplyBatch`` covers (``swarm.wire.codec.encode_reply``)."""

    swarm: str
    family: str
    request_id: str
    requester_id: str
    input_sha256: str
    responder_id: str
    variant: str
    model_sha256: str
    topk: tuple[tuple[int, int], ...]  # (class, probability in ppm), most probable first
    issued_at_ms: int
    infer_us: int  # how long the model took, as the peer reports it
    raw: bytes = dataclasses.field(repr=False, compare=False)

    def topk_probabilities(self) -> tuple[tuple[int, float], ...]:
        """``topk`` with probabilities as floats in [0, 1], as voting takes them."""
        return tuple((cls, ppm / PPM) for cls, ppm in self.topk)

    def digest(self) -> bytes:
        """What a batch signature covers of this reply: sha256 of its tag and bytes."""
        return hashlib.sha256(REPLY_TAG + self.raw).digest()


@dataclasses.dataclass(frozen=True, slots=True)
class ItemError:
    """An ask the peer refused or could not serve: a code and a text, unsigned (an
    error is not evidence of anything)."""

    request_id: str
    error: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class ReplyBatch:
    """A peer's answers to one group of asks, in order, its replies signed once."""

    responder_id: str
    items: tuple[InferReply | ItemError, ...]
    signature: bytes = dataclasses.field(repr=False)

    def signed_bytes(self) -> bytes:
        """The exact bytes the responder's signature covers: its replies, in order."""
        return reply_batch_signed_bytes(
            [i.digest() for i in self.items if isinstance(i, InferReply)]
        )

    @property
    def replies(self) -> tuple[InferReply, ...]:
        return tuple(i for i in self.items if isinstance(i, InferReply))


def topk_from_probs(probs: npt.ArrayLike, k: int) -> tuple[tuple[int, int], ...]:
    """The ``k`` most probable classes as (class, ppm), most probable first.

    Ties go to the lower class index. Probabilities summing to slightly more than 1
    (float32 softmax) are scaled down first, so an honest top-k always passes the
    requester's sum check.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probs must be one vector of class probabilities, got shape {p.shape}")
    if not 1 <= k <= p.size:
        raise ValueError(f"k must be in [1, {p.size}], got {k}")
    # A handful of classes: plain floats beat numpy's per-call overhead several times.
    values = p.tolist()
    if not all(0.0 <= v < math.inf for v in values):  # NaN fails too
        raise ValueError("probs must be finite and non-negative (a softmax output)")
    total = math.fsum(values)
    if total > 1.0 + 1e-3:
        raise ValueError(f"probs must sum to 1 (a softmax output), got {total:.6f}")
    scale = max(total, 1.0)
    order = sorted(range(len(values)), key=lambda c: (-values[c], c))[:k]
    return tuple((c, round(values[c] / scale * PPM)) for c in order)


def reply_batch_signed_bytes(digests: Sequence[bytes]) -> bytes:
    """A reply batch's signed bytes from its replies' digests (``InferReply.digest``)."""
    return BATCH_REPLY_TAG + b"".join(digests)


# --- the link's handshake ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LinkHello:
    """A requester's signed offer of a link: a fresh X25519 key, this link's only."""

    swarm: str
    family: str
    requester_id: str
    requester_key: bytes = dataclasses.field(repr=False)
    exchange_key: bytes = dataclasses.field(repr=False)
    issued_at_ms: int
    body: bytes = dataclasses.field(repr=False, compare=False)  # the exact signed bytes
    signature: bytes = dataclasses.field(repr=False)

    def signed_bytes(self) -> bytes:
        return HELLO_TAG + self.body


@dataclasses.dataclass(frozen=True, slots=True)
class LinkWelcome:
    """A peer's signed acceptance of a ``LinkHello``: its own X25519 key, bound to the
    hello by its hash, and how many asks it takes in flight on this link."""

    responder_id: str
    requester_id: str
    hello_sha256: bytes = dataclasses.field(repr=False)
    exchange_key: bytes = dataclasses.field(repr=False)
    max_asks: int
    issued_at_ms: int
    body: bytes = dataclasses.field(repr=False, compare=False)
    signature: bytes = dataclasses.field(repr=False)

    def signed_bytes(self) -> bytes:
        return WELCOME_TAG + self.body


# --- what travels sealed ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Ask:
    """One request as a link carries it (the link knows swarm, family and requester)."""

    request_id: str
    k: int
    deadline_ms: int
    input: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class Asks:
    """A group of asks, sent as one message; its answers come back as one."""

    exchange: int  # the requester's number for this group on this link
    items: tuple[Ask, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Answers:
    """A peer's answers to the group of asks numbered ``exchange``."""

    exchange: int
    batch: ReplyBatch
