"""Wire messages: an inference request, its reply, their canonical signed bytes.

Messages are JSON objects over HTTP. Binary fields (keys, signatures, the input tensor)
are standard base64. A signature covers a domain tag and the canonical JSON of every
field but ``signature`` (and, for a request, the raw ``input``, which the signed
``input_sha256`` binds instead)::

    b"vswarm/request/v1\\n" + canonical_json(payload)
    b"vswarm/reply/v1\\n" + canonical_json(payload)

so a signature made for one kind of message never verifies as another. Canonical JSON
follows RFC 8785 (JCS) for the values we allow: no floats at all (probabilities travel as
integer parts per million), integers within the I-JSON safe range, object keys sorted by
UTF-16 code units, no insignificant whitespace, UTF-8. Any implementation, in any
language, then signs exactly the bytes we verify.

Batches: a requester with several requests for one peer at once may send them as one
``InferBatch`` and get one ``ReplyBatch`` back, each signed once for all its items rather
than once per item, which is most of a small model's cost per input. Items travel
without signatures of their own; the batch signature covers the SHA-256 of each item's
signed bytes, in order::

    b"vswarm/request-batch/v1\n" + sha256(item.signed_bytes()) + ...
    b"vswarm/reply-batch/v1\n" + sha256(reply.signed_bytes()) + ...   (replies only)

A reply batch lists, per request item and in the same order, either its reply or an
error (a refused or failed item, which is not evidence of anything and so not signed).

``build_request`` and ``build_reply`` make signed messages (``build_batch`` and
``sign_replies`` batches); ``swarm.wire.codec`` encodes and decodes them, and ``swarm.wire.verify``
checks what decoding cannot.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from swarm import PROTOCOL_VERSION, config
from swarm.crypto.identity import SIGNATURE_LEN, Identity

REQUEST_TAG: Final = b"vswarm/request/v1\n"
REPLY_TAG: Final = b"vswarm/reply/v1\n"
BATCH_REQUEST_TAG: Final = b"vswarm/request-batch/v1\n"
BATCH_REPLY_TAG: Final = b"vswarm/reply-batch/v1\n"
SESSION_HELLO_TAG: Final = b"vswarm/session-hello/v1\n"
SESSION_WELCOME_TAG: Final = b"vswarm/session-welcome/v1\n"

PPM: Final = 1_000_000
# RFC 7493 (I-JSON) section 2.2: integers beyond 2**53 - 1 do not survive every parser.
MAX_SAFE_INT: Final = 2**53 - 1
# A request's time budget; anything longer is a mistake or an attempt to pin a worker.
MAX_DEADLINE_MS: Final = 60_000

_HEX_ID = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Swarm and variant names: the rule discovery announces them under (at most one DNS
# label, RFC 1035 section 2.3.4), safe in TXT records, logs and file names.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# The raw input is bound through the signed input_sha256 instead of being signed twice.
_REQUEST_UNSIGNED: Final = frozenset({"input", "signature"})
_REPLY_UNSIGNED: Final = frozenset({"signature"})
# json.dumps builds an encoder per call when given options; one is enough.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


# --- canonical JSON -------------------------------------------------------------------


def canonical_json(obj: object) -> bytes:
    """RFC 8785 canonical JSON of dicts, lists, strings, integers, booleans and None.

    Floats are refused: their canonical text differs between languages in practice, so
    signed values are integers (probabilities in parts per million).
    """
    return _utf8(_ENCODER.encode(_jcs_ordered(obj, 0)))


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("canonical_json: a string holds a lone surrogate") from exc


def _jcs_ordered(obj: object, depth: int) -> object:
    # json.dumps already writes strings and integers as RFC 8785 section 3.2.2 does; what
    # is left is to refuse other types and to order keys by UTF-16 code units (3.2.3).
    if depth > 32:
        raise ValueError("canonical_json: nesting deeper than 32 levels")
    if obj is None or type(obj) in (bool, str):
        return obj
    if type(obj) is int:
        if not -MAX_SAFE_INT <= obj <= MAX_SAFE_INT:
            raise ValueError(f"canonical_json: integer {obj} is outside +-(2**53 - 1)")
        return obj
    if type(obj) is list:
        return [_jcs_ordered(item, depth + 1) for item in obj]
    if type(obj) is dict:
        if not all(type(key) is str for key in obj):
            raise TypeError("canonical_json: object keys must be str")
        # ASCII keys (every field name) sort the same by code point as by UTF-16 unit.
        keys = (
            sorted(obj)
            if all(key.isascii() for key in obj)
            else sorted(obj, key=lambda key: key.encode("utf-16-be"))
        )
        return {key: _jcs_ordered(obj[key], depth + 1) for key in keys}
    if isinstance(obj, float | np.floating):
        raise TypeError(
            f"canonical_json: floats are not allowed ({obj!r}); send integers, "
            "e.g. probabilities in parts per million"
        )
    raise TypeError(f"canonical_json: {type(obj).__name__} is not allowed")


# --- messages -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class InferRequest:
    """A signed request to classify one input tensor."""

    version: int
    swarm: str
    request_id: str  # 32 lowercase hex characters, random
    requester_id: str
    requester_key: bytes = dataclasses.field(repr=False)
    input_sha256: str  # hex sha256 of ``input``
    input_shape: tuple[int, ...]
    input: bytes = dataclasses.field(repr=False)  # float32, little-endian, C order
    k: int
    issued_at_ms: int  # unix time of the requester's clock
    deadline_ms: int  # the budget the requester gives this request, from issued_at_ms
    signature: bytes = dataclasses.field(repr=False)

    def tensor(self) -> npt.NDArray[np.float32]:
        """The input as a native float32 array of shape ``input_shape`` (a copy)."""
        flat = np.frombuffer(self.input, dtype="<f4")
        return flat.reshape(self.input_shape).astype(np.float32)

    def signed_bytes(self) -> bytes:
        """The exact bytes the requester's signature covers."""
        return REQUEST_TAG + _message_json(self, _REQUEST_UNSIGNED)


@dataclasses.dataclass(frozen=True, slots=True)
class InferReply:
    """A peer's signed top-k answer to one request."""

    version: int
    swarm: str
    request_id: str
    requester_id: str
    input_sha256: str
    responder_id: str
    variant: str
    model_sha256: str
    topk: tuple[tuple[int, int], ...]  # (class, probability in ppm), most probable first
    issued_at_ms: int
    infer_us: int  # time the model took, for latency-aware peer selection
    signature: bytes = dataclasses.field(repr=False)

    def topk_probabilities(self) -> tuple[tuple[int, float], ...]:
        """``topk`` with probabilities as floats in [0, 1], as voting takes them."""
        return tuple((cls, ppm / PPM) for cls, ppm in self.topk)

    def signed_bytes(self) -> bytes:
        """The exact bytes the responder's signature covers."""
        return REPLY_TAG + _message_json(self, _REPLY_UNSIGNED)


@dataclasses.dataclass(frozen=True, slots=True)
class InferBatch:
    """Several requests of one requester to one peer, signed once (items unsigned)."""

    requester_key: bytes = dataclasses.field(repr=False)
    items: tuple[InferRequest, ...]
    signature: bytes = dataclasses.field(repr=False)

    def signed_bytes(self) -> bytes:
        """The exact bytes the requester's batch signature covers."""
        return BATCH_REQUEST_TAG + b"".join(_digest(item) for item in self.items)


@dataclasses.dataclass(frozen=True, slots=True)
class ItemError:
    """A batch item the peer refused or could not serve (an HTTP error's code and text)."""

    request_id: str
    error: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class ReplyBatch:
    """A peer's answers to an ``InferBatch``, item by item, signed once (replies unsigned)."""

    responder_id: str
    items: tuple[InferReply | ItemError, ...]
    signature: bytes = dataclasses.field(repr=False)

    def signed_bytes(self) -> bytes:
        """The exact bytes the responder's batch signature covers: its replies, in order."""
        return _reply_batch_bytes(
            [_message_json(i, _REPLY_UNSIGNED) for i in self.items if isinstance(i, InferReply)]
        )


@dataclasses.dataclass(frozen=True, slots=True)
class SessionHello:
    """A requester's signed offer of a session: a fresh X25519 key (``swarm.crypto.session``)."""

    version: int
    swarm: str
    requester_id: str
    requester_key: bytes = dataclasses.field(repr=False)
    exchange_key: bytes = dataclasses.field(repr=False)  # X25519 public key, this session's
    issued_at_ms: int
    signature: bytes = dataclasses.field(repr=False)

    def signed_bytes(self) -> bytes:
        """The exact bytes the requester's signature covers."""
        return SESSION_HELLO_TAG + _message_json(self, _REPLY_UNSIGNED)


@dataclasses.dataclass(frozen=True, slots=True)
class SessionWelcome:
    """A peer's signed acceptance of a ``SessionHello``: its own X25519 key, bound to the
    hello by its hash, and the session's id and lifetime."""

    version: int
    swarm: str
    responder_id: str
    requester_id: str
    hello_sha256: str  # hex sha256 of the hello's signed bytes
    session_id: str  # 32 lowercase hex characters, random
    exchange_key: bytes = dataclasses.field(repr=False)
    ttl_ms: int  # the peer forgets the session this long after issued_at_ms, or sooner
    issued_at_ms: int
    signature: bytes = dataclasses.field(repr=False)

    def signed_bytes(self) -> bytes:
        """The exact bytes the responder's signature covers."""
        return SESSION_WELCOME_TAG + _message_json(self, _REPLY_UNSIGNED)


_Signed = InferRequest | InferReply | SessionHello | SessionWelcome


def _digest(msg: InferRequest | InferReply) -> bytes:
    return hashlib.sha256(msg.signed_bytes()).digest()


# dataclasses.fields() rebuilds its tuple on every call; messages are made per request.
_FIELD_NAMES: Final[dict[type, tuple[str, ...]]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls))
    for cls in (InferRequest, InferReply, SessionHello, SessionWelcome)
}
# Field names are ASCII, so code-point order is RFC 8785's UTF-16 order.
_SORTED_FIELD_NAMES: Final = {cls: tuple(sorted(names)) for cls, names in _FIELD_NAMES.items()}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _payload(msg: _Signed, skip: frozenset[str]) -> dict[str, object]:
    names = _FIELD_NAMES[type(msg)]
    return {name: _jsonable(getattr(msg, name)) for name in names if name not in skip}


def _message_json(msg: _Signed, skip: frozenset[str] = frozenset()) -> bytes:
    """``canonical_json(_payload(msg, skip))``, byte for byte, without its generic walk.

    Strings, bytes and safe integers (nearly every field) are placed directly; anything
    else takes the generic path, with the same checks and errors.
    """
    ordered: dict[str, object] = {}
    for name in _SORTED_FIELD_NAMES[type(msg)]:
        if name in skip:
            continue
        value = getattr(msg, name)
        kind = type(value)
        if kind is str:
            ordered[name] = value
        elif kind is bytes:
            ordered[name] = _b64(value)
        elif kind is int and -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            ordered[name] = value
        elif kind is tuple and (rows := _int_rows(value)) is not None:
            ordered[name] = rows
        else:
            ordered[name] = _jcs_ordered(_jsonable(value), 1)
    return _utf8(_ENCODER.encode(ordered))


def _int_rows(value: tuple[object, ...]) -> list[object] | None:
    """A tuple of safe integers, or of tuples of them (``input_shape``, ``topk``), as
    the lists ``_jcs_ordered`` would make of it; None for anything else."""
    out: list[object] = []
    for item in value:
        if type(item) is int and -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
            out.append(item)
        elif type(item) is tuple and all(
            type(x) is int and -MAX_SAFE_INT <= x <= MAX_SAFE_INT for x in item
        ):
            out.append(list(item))
        else:
            return None
    return out


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return _b64(value)
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    return value


def unix_ms() -> int:
    """The wall clock in unix milliseconds, the time base of ``issued_at_ms``."""
    return time.time_ns() // 1_000_000


def is_valid_name(name: str) -> bool:
    """True if ``name`` can be a swarm or variant name (1-63 of ``A-Za-z0-9._-``)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def input_sha256(raw: bytes) -> str:
    """Hex sha256 of an input tensor's raw float32 little-endian bytes."""
    return hashlib.sha256(raw).hexdigest()


def tensor_bytes(tensor: npt.ArrayLike) -> bytes:
    """The canonical raw bytes of an input tensor; ``ValueError`` if it is not one."""
    arr = np.asarray(tensor)
    if arr.shape != config.INPUT_SHAPE:
        raise ValueError(f"an input tensor has shape {config.INPUT_SHAPE}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"an input tensor holds floats in [0, 1], got dtype {arr.dtype}")
    le = np.ascontiguousarray(arr, dtype="<f4")
    # NaN fails both comparisons, infinities one: two reductions check all three rules.
    if not (float(le.min()) >= 0.0 and float(le.max()) <= 1.0):
        raise ValueError("an input tensor holds finite values in [0, 1] (pixel / 255)")
    return le.tobytes()


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


# --- building -------------------------------------------------------------------------


def build_request(
    identity: Identity,
    *,
    swarm: str,
    tensor: npt.ArrayLike,
    k: int = config.DEFAULT_TOP_K,
    deadline_ms: int,
    now_ms: int | None = None,
    request_id: str | None = None,
    sign: bool = True,
) -> InferRequest:
    """A request for ``tensor`` (shape ``config.INPUT_SHAPE``), signed by ``identity``
    (with ``sign=False`` a zero signature: for peers whose sessions' MACs authenticate it,
    ``swarm.crypto.session``)."""
    if not is_valid_name(swarm):
        raise ValueError(f"invalid swarm name {swarm!r}: use 1-63 of A-Za-z0-9._-")
    if not 1 <= k <= config.MAX_TOP_K:
        raise ValueError(f"k must be in [1, {config.MAX_TOP_K}], got {k}")
    if not 1 <= deadline_ms <= MAX_DEADLINE_MS:
        raise ValueError(f"deadline_ms must be in [1, {MAX_DEADLINE_MS}], got {deadline_ms}")
    rid = secrets.token_hex(16) if request_id is None else request_id
    if _HEX_ID.fullmatch(rid) is None:
        raise ValueError(f"request_id must be 32 lowercase hex characters, got {rid!r}")
    raw = tensor_bytes(tensor)
    unsigned = InferRequest(
        version=PROTOCOL_VERSION,
        swarm=swarm,
        request_id=rid,
        requester_id=identity.peer_id,
        requester_key=identity.public_key,
        input_sha256=input_sha256(raw),
        input_shape=config.INPUT_SHAPE,
        input=raw,
        k=k,
        issued_at_ms=unix_ms() if now_ms is None else now_ms,
        deadline_ms=deadline_ms,
        signature=b"" if sign else bytes(SIGNATURE_LEN),
    )
    if not sign:
        return unsigned
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))


def build_batch(
    identity: Identity, requests: Sequence[InferRequest], *, sign: bool = True
) -> InferBatch:
    """``requests`` (made by ``identity``) as one batch signed by ``identity`` (with
    ``sign=False`` a zero signature: for a session, whose MAC authenticates it)."""
    if not 1 <= len(requests) <= config.MAX_BATCH_ITEMS:
        raise ValueError(f"a batch holds 1 to {config.MAX_BATCH_ITEMS} requests")
    if any(r.requester_key != identity.public_key for r in requests):
        raise ValueError("every request of a batch must be the batch signer's own")
    items = tuple(dataclasses.replace(r, signature=b"") for r in requests)
    if not sign:
        return InferBatch(identity.public_key, items, bytes(SIGNATURE_LEN))
    unsigned = InferBatch(identity.public_key, items, b"")
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))


def sign_replies(identity: Identity, items: Sequence[InferReply | ItemError]) -> ReplyBatch:
    """One signature of ``identity`` over the replies among ``items`` (theirs stripped)."""
    return signed_reply_batch(identity, items)[0]


def signed_reply_batch(
    identity: Identity, items: Sequence[InferReply | ItemError]
) -> tuple[ReplyBatch, list[bytes]]:
    """``sign_replies``, and each reply's canonical JSON without its signature: what the
    batch's signature covers (by digest) and what its body holds, made once for both."""
    bare = tuple(
        dataclasses.replace(i, signature=b"") if isinstance(i, InferReply) and i.signature else i
        for i in items
    )
    texts = [_message_json(i, _REPLY_UNSIGNED) for i in bare if isinstance(i, InferReply)]
    return ReplyBatch(identity.peer_id, bare, identity.sign(_reply_batch_bytes(texts))), texts


def _reply_batch_bytes(texts: Sequence[bytes]) -> bytes:
    # A reply batch's signed bytes from its replies' canonical JSON (without signatures):
    # the digest of each as a single reply would be signed (REPLY_TAG + its JSON), in order.
    return BATCH_REPLY_TAG + b"".join(hashlib.sha256(REPLY_TAG + t).digest() for t in texts)


def build_reply(
    identity: Identity,
    request: InferRequest,
    *,
    variant: str,
    model_sha256: str,
    probs: npt.ArrayLike,
    k: int | None = None,
    infer_us: int,
    now_ms: int | None = None,
    sign: bool = True,
) -> InferReply:
    """The signed top-k answer of ``identity``'s model to ``request`` (unsigned with
    ``sign=False``: an item of a ``ReplyBatch``, which ``sign_replies`` signs)."""
    top = request.k if k is None else k
    if not 1 <= top <= request.k:
        raise ValueError(f"k must be in [1, {request.k}] (what the request asked), got {top}")
    if not is_valid_name(variant):
        raise ValueError(f"invalid variant name {variant!r}: use 1-63 of A-Za-z0-9._-")
    if _SHA256.fullmatch(model_sha256) is None:
        raise ValueError(f"model_sha256 must be 64 lowercase hex characters: {model_sha256!r}")
    p = np.asarray(probs)
    if p.shape != (config.NUM_CLASSES,):
        raise ValueError(f"probs must have shape ({config.NUM_CLASSES},), got {p.shape}")
    unsigned = InferReply(
        version=PROTOCOL_VERSION,
        swarm=request.swarm,
        request_id=request.request_id,
        requester_id=request.requester_id,
        input_sha256=request.input_sha256,
        responder_id=identity.peer_id,
        variant=variant,
        model_sha256=model_sha256,
        topk=topk_from_probs(p, top),
        issued_at_ms=unix_ms() if now_ms is None else now_ms,
        infer_us=max(0, infer_us),
        signature=b"",
    )
    if not sign:
        return unsigned
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))


def build_hello(
    identity: Identity, *, swarm: str, exchange_key: bytes, now_ms: int | None = None
) -> SessionHello:
    """A session offer of ``identity`` with the X25519 public key ``exchange_key``."""
    if not is_valid_name(swarm):
        raise ValueError(f"invalid swarm name {swarm!r}: use 1-63 of A-Za-z0-9._-")
    unsigned = SessionHello(
        version=PROTOCOL_VERSION,
        swarm=swarm,
        requester_id=identity.peer_id,
        requester_key=identity.public_key,
        exchange_key=exchange_key,
        issued_at_ms=unix_ms() if now_ms is None else now_ms,
        signature=b"",
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))


def build_welcome(
    identity: Identity,
    hello: SessionHello,
    *,
    session_id: str,
    exchange_key: bytes,
    ttl_ms: int,
    now_ms: int | None = None,
) -> SessionWelcome:
    """``identity``'s signed acceptance of ``hello`` as session ``session_id``."""
    if _HEX_ID.fullmatch(session_id) is None:
        raise ValueError(f"session_id must be 32 lowercase hex characters, got {session_id!r}")
    unsigned = SessionWelcome(
        version=PROTOCOL_VERSION,
        swarm=hello.swarm,
        responder_id=identity.peer_id,
        requester_id=hello.requester_id,
        hello_sha256=hashlib.sha256(hello.signed_bytes()).hexdigest(),
        session_id=session_id,
        exchange_key=exchange_key,
        ttl_ms=ttl_ms,
        issued_at_ms=unix_ms() if now_ms is None else now_ms,
        signature=b"",
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))
