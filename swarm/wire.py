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

``decode_request`` and ``decode_reply`` are the one place where untrusted bytes become
messages. They bound the size first, then check every field's type, range, length and
encoding, and raise ``DecodeError`` (never anything else) naming the field that is wrong.
``verify_request`` and ``verify_reply`` then check what decoding cannot: signatures,
keys, the binding of a reply to its request, freshness and replays. They raise
``VerificationError`` whose ``reason`` is one of ``REJECT_REASONS``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import math
import re
import secrets
import time
from collections import OrderedDict
from typing import Any, Final, NoReturn, TypeVar

import numpy as np
import numpy.typing as npt

from swarm import PROTOCOL_VERSION, config
from swarm.errors import DecodeError, MessageTooLargeError, VerificationError
from swarm.identity import (
    PEER_ID_LEN,
    PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    Identity,
    TrustStore,
    peer_id_for,
    verify_signature,
)

REQUEST_TAG: Final = b"vswarm/request/v1\n"
REPLY_TAG: Final = b"vswarm/reply/v1\n"

PPM: Final = 1_000_000
# Each top-k entry is rounded to the nearest ppm (error <= 0.5), so an honest top-k of
# probabilities summing to at most 1 never exceeds PPM + k/2.
TOPK_SUM_SLACK_PPM: Final = config.MAX_TOP_K
# RFC 7493 (I-JSON) section 2.2: integers beyond 2**53 - 1 do not survive every parser.
MAX_SAFE_INT: Final = 2**53 - 1
# A request's time budget; anything longer is a mistake or an attempt to pin a worker.
MAX_DEADLINE_MS: Final = 60_000

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

_HEX_ID = re.compile(r"[0-9a-f]{32}")
_PEER_ID = re.compile(rf"[0-9a-f]{{{PEER_ID_LEN}}}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Swarm and variant names: the rule discovery announces them under (at most one DNS
# label, RFC 1035 section 2.3.4), safe in TXT records, logs and file names.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_INPUT_LEN: Final = math.prod(config.INPUT_SHAPE) * 4
_NAME_RULE: Final = (_NAME, "a name of 1-63 of A-Za-z0-9._-")
_PEER_ID_RULE: Final = (_PEER_ID, "a peer id of 20 lowercase hex characters")
_SHA256_RULE: Final = (_SHA256, "64 lowercase hex characters")
_STR_FIELDS: Final[dict[str, tuple[re.Pattern[str], str]]] = {
    "swarm": _NAME_RULE,
    "variant": _NAME_RULE,
    "request_id": (_HEX_ID, "32 lowercase hex characters"),
    "requester_id": _PEER_ID_RULE,
    "responder_id": _PEER_ID_RULE,
    "input_sha256": _SHA256_RULE,
    "model_sha256": _SHA256_RULE,
}
_INT_FIELDS: Final[dict[str, tuple[int, int]]] = {
    "version": (0, MAX_SAFE_INT),
    "k": (1, config.MAX_TOP_K),
    "issued_at_ms": (0, MAX_SAFE_INT),
    "deadline_ms": (1, MAX_DEADLINE_MS),
    "infer_us": (0, MAX_SAFE_INT),
}
_B64_FIELDS: Final[dict[str, int]] = {
    "requester_key": PUBLIC_KEY_LEN,
    "input": _INPUT_LEN,
    "signature": SIGNATURE_LEN,
}
# The raw input is bound through the signed input_sha256 instead of being signed twice.
_REQUEST_UNSIGNED: Final = frozenset({"input", "signature"})
_REPLY_UNSIGNED: Final = frozenset({"signature"})

# What the standard library raises on hostile input; anything else is a bug of ours.
_DECODE_ERRORS: Final = (ValueError, TypeError, KeyError, IndexError, RecursionError)


# --- canonical JSON -------------------------------------------------------------------


def canonical_json(obj: object) -> bytes:
    """RFC 8785 canonical JSON of dicts, lists, strings, integers, booleans and None.

    Floats are refused: their canonical text differs between languages in practice, so
    signed values are integers (probabilities in parts per million).
    """
    text = json.dumps(_jcs_ordered(obj, 0), ensure_ascii=False, separators=(",", ":"))
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
        keys = sorted(obj, key=lambda key: key.encode("utf-16-be"))
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
        return REQUEST_TAG + canonical_json(_payload(self, _REQUEST_UNSIGNED))


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
        return REPLY_TAG + canonical_json(_payload(self, _REPLY_UNSIGNED))


_Msg = TypeVar("_Msg", InferRequest, InferReply)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _payload(msg: InferRequest | InferReply, skip: frozenset[str]) -> dict[str, object]:
    return {
        f.name: _jsonable(getattr(msg, f.name))
        for f in dataclasses.fields(msg)
        if f.name not in skip
    }


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
    if not bool(np.all(np.isfinite(le))) or float(le.min()) < 0.0 or float(le.max()) > 1.0:
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
    if not bool(np.all(np.isfinite(p))) or float(p.min()) < 0.0:
        raise ValueError("probs must be finite and non-negative (a softmax output)")
    total = float(p.sum())
    if total > 1.0 + 1e-3:
        raise ValueError(f"probs must sum to 1 (a softmax output), got {total:.6f}")
    p = p / max(total, 1.0)
    order = np.lexsort((np.arange(p.size), -p))[:k]
    return tuple((int(c), round(float(p[c]) * PPM)) for c in order)


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
) -> InferRequest:
    """A request for ``tensor`` (shape ``config.INPUT_SHAPE``), signed by ``identity``."""
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
        signature=b"",
    )
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))


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
) -> InferReply:
    """The signed top-k answer of ``identity``'s model to ``request``."""
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
    return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))


# --- encoding and decoding ------------------------------------------------------------


def encode_request(req: InferRequest) -> bytes:
    """The HTTP body of ``req``."""
    return canonical_json(_payload(req, frozenset()))


def encode_reply(reply: InferReply) -> bytes:
    """The HTTP body of ``reply``."""
    return canonical_json(_payload(reply, frozenset()))


def decode_request(body: bytes) -> InferRequest:
    """Parse and validate an untrusted request body; ``DecodeError`` says what is wrong."""
    return _decode(body, InferRequest, config.MAX_INFER_BODY, "request")


def decode_reply(body: bytes) -> InferReply:
    """Parse and validate an untrusted reply body; ``DecodeError`` says what is wrong."""
    return _decode(body, InferReply, config.MAX_REPLY_BODY, "reply")


def _decode(body: bytes, cls: type[_Msg], limit: int, what: str) -> _Msg:
    names = [f.name for f in dataclasses.fields(cls)]
    obj = _parse(body, limit, frozenset(names), what)
    values: dict[str, Any] = {}
    try:
        for name in names:
            if name in _STR_FIELDS:
                values[name] = _get_str(obj, name, *_STR_FIELDS[name])
            elif name in _INT_FIELDS:
                values[name] = _get_int(obj, name, *_INT_FIELDS[name])
            elif name in _B64_FIELDS:
                values[name] = _get_b64(obj, name, _B64_FIELDS[name])
            elif name == "topk":
                values[name] = _get_topk(obj)
            elif name == "input_shape":
                if type(obj[name]) is not list or tuple(obj[name]) != config.INPUT_SHAPE:
                    _bad(name, f"the list {list(config.INPUT_SHAPE)}", obj[name])
                values[name] = config.INPUT_SHAPE
            else:  # pragma: no cover - every field of a message has a rule above
                raise AssertionError(name)
        if "input" in values:
            pixels = np.frombuffer(values["input"], dtype="<f4")
            if not bool(np.all(np.isfinite(pixels))):
                _bad("input", "finite float32 values", "NaN or infinity")
            if float(pixels.min()) < 0.0 or float(pixels.max()) > 1.0:
                _bad("input", "values in [0, 1] (pixel / 255)", "values outside it")
        return cls(**values)
    except _DECODE_ERRORS as exc:
        raise DecodeError(f"malformed {what}: {exc}") from exc


def _parse(body: bytes, limit: int, fields: frozenset[str], what: str) -> dict[str, Any]:
    if len(body) > limit:
        raise MessageTooLargeError(f"{what} body is {len(body)} bytes; the limit is {limit}")
    try:
        obj = json.loads(
            bytes(body).decode("utf-8"),
            parse_float=_no_float,
            parse_constant=_no_float,
            object_pairs_hook=_no_duplicates,
        )
    except _DECODE_ERRORS as exc:
        raise DecodeError(f"{what} body is not UTF-8 JSON without floats: {exc}") from exc
    if type(obj) is not dict:
        raise DecodeError(f"{what} body must be a JSON object, got {type(obj).__name__}")
    version = obj.get("version")
    if type(version) is int and version != PROTOCOL_VERSION:
        raise DecodeError(
            f"{what} speaks protocol version {version}; this peer speaks {PROTOCOL_VERSION}"
        )
    missing = sorted(fields - obj.keys())
    unexpected = sorted(obj.keys() - fields)
    if missing:
        raise DecodeError(f"{what} lacks field(s) {', '.join(missing)}")
    if unexpected:
        raise DecodeError(f"{what} has unexpected field(s) {_brief(unexpected)}")
    return obj


def _no_float(text: str) -> NoReturn:
    raise ValueError(f"floats are not allowed ({_brief(text)}); numbers are integers")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins: a message must mean one thing.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("an object has a duplicate key")
    return obj


def _bad(field: str, expected: str, got: object) -> NoReturn:
    raise DecodeError(f"field {field!r}: expected {expected}, got {_brief(got)}")


def _get_int(obj: dict[str, Any], field: str, lo: int, hi: int) -> int:
    value = obj[field]
    if type(value) is not int or not lo <= value <= hi:
        _bad(field, f"an integer in [{lo}, {hi}]", value)
    return value


def _get_str(obj: dict[str, Any], field: str, pattern: re.Pattern[str], expected: str) -> str:
    value = obj[field]
    if type(value) is not str or pattern.fullmatch(value) is None:
        _bad(field, expected, value)
    return value


def _get_b64(obj: dict[str, Any], field: str, length: int) -> bytes:
    value = obj[field]
    expected = f"standard base64 of {length} bytes"
    if type(value) is not str or not value.isascii() or len(value) != 4 * ((length + 2) // 3):
        _bad(field, expected, value)
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        _bad(field, expected, value)
    if len(raw) != length or _b64(raw) != value:
        _bad(field, expected, value)
    return raw


def _get_topk(obj: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    value = obj["topk"]
    expected = (
        f"a list of 1 to {config.MAX_TOP_K} [class, ppm] pairs with class in "
        f"[0, {config.NUM_CLASSES - 1}] and ppm in [0, {PPM}]"
    )
    if type(value) is not list or not 1 <= len(value) <= config.MAX_TOP_K:
        _bad("topk", expected, value)
    pairs: list[tuple[int, int]] = []
    for entry in value:
        if (
            type(entry) is not list
            or len(entry) != 2
            or type(entry[0]) is not int
            or type(entry[1]) is not int
            or not 0 <= entry[0] < config.NUM_CLASSES
            or not 0 <= entry[1] <= PPM
        ):
            _bad("topk", expected, entry)
        pairs.append((entry[0], entry[1]))
    return tuple(pairs)


def _brief(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- verification ---------------------------------------------------------------------


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
) -> None:
    """Accept ``req`` or raise ``VerificationError``; an accepted request is remembered.

    Cheap checks come first, the signature next, and the request is added to ``seen``
    only once everything passed, so a forged copy cannot block the genuine one.
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
    if not verify_signature(req.requester_key, req.signature, req.signed_bytes()):
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
) -> None:
    """Accept ``reply`` to ``request`` from the peer we asked, or raise ``VerificationError``.

    ``expected_key`` is the key that peer announced; every check after the signature
    concerns signed content (see ``ATTRIBUTABLE_REPLY_REASONS``).
    """
    if peer_id_for(expected_key) != expected_peer_id or not trust.allows(expected_key):
        _reject(WRONG_KEY, f"the key announced by {expected_peer_id} is not its own or not trusted")
    if reply.responder_id != expected_peer_id:
        _reject(WRONG_PEER, f"reply from {reply.responder_id}, asked {expected_peer_id}")
    if not verify_signature(expected_key, reply.signature, reply.signed_bytes()):
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
