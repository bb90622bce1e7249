"""The wire format: message bodies out, untrusted bytes in; the swarm imports it from here.

``decode_request`` and ``decode_reply`` are the one place where untrusted bytes become
messages. They bound the size first, then check every field's type, range, length and
encoding, and raise ``DecodeError`` (never anything else) naming the field that is wrong.

The messages and their canonical signed bytes live in ``swarm.wire.messages``, the checks
that decoding cannot make in ``swarm.wire.verify``; both are re-exported here, so callers
import the whole wire format from ``swarm.wire``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import Any, Final, NoReturn, TypeVar

import numpy as np

from swarm import PROTOCOL_VERSION, config
from swarm.crypto.identity import PEER_ID_LEN, PUBLIC_KEY_LEN, SIGNATURE_LEN
from swarm.errors import DecodeError, MessageTooLargeError
from swarm.wire.messages import (
    _FIELD_NAMES,
    _HEX_ID,
    _NAME,
    _SHA256,
    BATCH_REPLY_TAG,
    BATCH_REQUEST_TAG,
    MAX_DEADLINE_MS,
    MAX_SAFE_INT,
    PPM,
    REPLY_TAG,
    REQUEST_TAG,
    SESSION_HELLO_TAG,
    SESSION_WELCOME_TAG,
    InferBatch,
    InferReply,
    InferRequest,
    ItemError,
    ReplyBatch,
    SessionHello,
    SessionWelcome,
    _b64,
    _message_json,
    build_batch,
    build_hello,
    build_reply,
    build_request,
    build_welcome,
    canonical_json,
    input_sha256,
    is_valid_name,
    sign_replies,
    signed_reply_batch,
    tensor_bytes,
    topk_from_probs,
    unix_ms,
)
from swarm.wire.verify import (
    ATTRIBUTABLE_REPLY_REASONS,
    BAD_SIGNATURE,
    BAD_TOPK,
    INPUT_MISMATCH,
    REJECT_REASONS,
    REPLAYED,
    STALE,
    TOPK_SUM_SLACK_PPM,
    UNTRUSTED_KEY,
    WRONG_BINDING,
    WRONG_KEY,
    WRONG_PEER,
    WRONG_SWARM,
    WRONG_VARIANT,
    WRONG_VERSION,
    ReplayCache,
    verify_reply,
    verify_reply_batch,
    verify_reply_signature,
    verify_request,
)

__all__ = [
    "ATTRIBUTABLE_REPLY_REASONS",
    "BAD_SIGNATURE",
    "BAD_TOPK",
    "BATCH_REPLY_TAG",
    "BATCH_REQUEST_TAG",
    "INPUT_MISMATCH",
    "MAX_DEADLINE_MS",
    "MAX_SAFE_INT",
    "PPM",
    "REJECT_REASONS",
    "REPLAYED",
    "REPLY_TAG",
    "REQUEST_TAG",
    "SESSION_HELLO_TAG",
    "SESSION_WELCOME_TAG",
    "STALE",
    "TOPK_SUM_SLACK_PPM",
    "UNTRUSTED_KEY",
    "WRONG_BINDING",
    "WRONG_KEY",
    "WRONG_PEER",
    "WRONG_SWARM",
    "WRONG_VARIANT",
    "WRONG_VERSION",
    "InferBatch",
    "InferReply",
    "InferRequest",
    "ItemError",
    "ReplayCache",
    "ReplyBatch",
    "SessionHello",
    "SessionWelcome",
    "build_batch",
    "build_hello",
    "build_reply",
    "build_request",
    "build_welcome",
    "canonical_json",
    "decode_batch",
    "decode_hello",
    "decode_reply",
    "decode_reply_batch",
    "decode_request",
    "decode_welcome",
    "encode_batch",
    "encode_hello",
    "encode_reply",
    "encode_reply_batch",
    "encode_request",
    "encode_welcome",
    "input_sha256",
    "is_valid_name",
    "sign_replies",
    "signed_reply_batch",
    "tensor_bytes",
    "topk_from_probs",
    "unix_ms",
    "verify_reply",
    "verify_reply_batch",
    "verify_reply_signature",
    "verify_request",
]

_PEER_ID = re.compile(rf"[0-9a-f]{{{PEER_ID_LEN}}}")
_INPUT_LEN: Final = math.prod(config.INPUT_SHAPE) * 4
EXCHANGE_KEY_LEN: Final = 32  # an X25519 public key (RFC 7748)
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
    "hello_sha256": _SHA256_RULE,
    "session_id": (_HEX_ID, "32 lowercase hex characters"),
}
_INT_FIELDS: Final[dict[str, tuple[int, int]]] = {
    "version": (0, MAX_SAFE_INT),
    "k": (1, config.MAX_TOP_K),
    "issued_at_ms": (0, MAX_SAFE_INT),
    "deadline_ms": (1, MAX_DEADLINE_MS),
    "infer_us": (0, MAX_SAFE_INT),
    "ttl_ms": (1, config.MAX_SESSION_TTL_MS),
}
_B64_FIELDS: Final[dict[str, int]] = {
    "requester_key": PUBLIC_KEY_LEN,
    "input": _INPUT_LEN,
    "signature": SIGNATURE_LEN,
    "exchange_key": EXCHANGE_KEY_LEN,
}

# A batch item travels without a signature of its own: the batch's covers it.
_UNSIGNED: Final = frozenset({"signature"})
_BATCH_FIELDS: Final = {
    head: frozenset({"version", head, "items", "signature"})
    for head in ("requester_key", "responder_id")
}
_ITEM_ERROR_FIELDS: Final = frozenset({"request_id", "error", "message"})
_ERROR_CODE: Final = re.compile(r"[a-z_]{1,40}")
_MAX_ERROR_MESSAGE: Final = 300

# What the standard library raises on hostile input; anything else is a bug of ours.
_DECODE_ERRORS: Final = (ValueError, TypeError, KeyError, IndexError, RecursionError)

_Msg = TypeVar("_Msg", InferRequest, InferReply, SessionHello, SessionWelcome)


# --- encoding and decoding ------------------------------------------------------------


def encode_request(req: InferRequest) -> bytes:
    """The HTTP body of ``req``."""
    return _message_json(req)


def encode_reply(reply: InferReply) -> bytes:
    """The HTTP body of ``reply``."""
    return _message_json(reply)


def decode_request(body: bytes) -> InferRequest:
    """Parse and validate an untrusted request body; ``DecodeError`` says what is wrong."""
    return _decode(body, InferRequest, config.MAX_INFER_BODY, "request")


def decode_reply(body: bytes) -> InferReply:
    """Parse and validate an untrusted reply body; ``DecodeError`` says what is wrong."""
    return _decode(body, InferReply, config.MAX_REPLY_BODY, "reply")


def encode_hello(hello: SessionHello) -> bytes:
    """The HTTP body of ``hello`` (``POST /v1/session``)."""
    return _message_json(hello)


def encode_welcome(welcome: SessionWelcome) -> bytes:
    """The HTTP body of ``welcome``."""
    return _message_json(welcome)


def decode_hello(body: bytes) -> SessionHello:
    """Parse and validate an untrusted session offer; ``DecodeError`` says what is wrong."""
    return _decode(body, SessionHello, config.MAX_SESSION_BODY, "session hello")


def decode_welcome(body: bytes) -> SessionWelcome:
    """Parse and validate an untrusted session acceptance; ``DecodeError`` says what is wrong."""
    return _decode(body, SessionWelcome, config.MAX_SESSION_BODY, "session welcome")


def encode_batch(batch: InferBatch, *, bodies: Sequence[bytes] | None = None) -> bytes:
    """The HTTP body of ``batch`` (``POST /v1/infer/batch``). ``bodies``: the items'
    own request bodies (``encode_request``), spliced in as they are instead of encoding
    each item again; an item may carry its own signature, which the batch's replaces."""
    if bodies is not None and len(bodies) != len(batch.items):
        raise ValueError(f"{len(bodies)} bodies for {len(batch.items)} items")
    head = {"requester_key": _b64(batch.requester_key)}
    return _batch_json(head, batch.items, batch.signature, bodies)


def encode_reply_batch(batch: ReplyBatch, *, texts: Sequence[bytes] | None = None) -> bytes:
    """The HTTP body of ``batch``. ``texts``: its replies' canonical JSON as
    ``signed_reply_batch`` made it for the signature, spliced in instead of encoding each
    reply again."""
    bodies = None
    if texts is not None:
        replies = iter(texts)
        bodies = [
            next(replies) if isinstance(i, InferReply) else canonical_json(dataclasses.asdict(i))
            for i in batch.items
        ]
        if next(replies, None) is not None:
            raise ValueError("more texts than replies in the batch")
    return _batch_json({"responder_id": batch.responder_id}, batch.items, batch.signature, bodies)


def _batch_json(
    head: dict[str, str],
    items: Sequence[InferRequest | InferReply | ItemError],
    signature: bytes,
    bodies: Sequence[bytes] | None = None,
) -> bytes:
    # Items are encoded one by one (each as canonical as a single message) and spliced.
    parts = (
        list(bodies)
        if bodies is not None
        else [
            _message_json(i, _UNSIGNED)
            if not isinstance(i, ItemError)
            else canonical_json(dataclasses.asdict(i))
            for i in items
        ]
    )
    fields = {"version": PROTOCOL_VERSION, **head, "signature": _b64(signature)}
    text = json.dumps(fields, separators=(",", ":"))
    return text[:-1].encode() + b',"items":[' + b",".join(parts) + b"]}"


def decode_batch(body: bytes) -> InferBatch:
    """Parse and validate an untrusted batch of requests; ``DecodeError`` says what is wrong."""
    obj = _parse(body, config.MAX_INFER_BATCH_BODY, _BATCH_FIELDS["requester_key"], "batch")
    try:
        _get_int(obj, "version", *_INT_FIELDS["version"])
        key = _get_b64(obj, "requester_key", PUBLIC_KEY_LEN)
        signature = _get_b64(obj, "signature", SIGNATURE_LEN)
        # An item's own signature, if it has one, is ignored: the batch's covers it.
        items = tuple(
            _values(item, InferRequest, f"batch item {i}", ignore=_UNSIGNED)
            if type(item) is dict and "signature" in item
            else _values(item, InferRequest, f"batch item {i}", _UNSIGNED)
            for i, item in enumerate(_get_items(obj))
        )
    except _DECODE_ERRORS as exc:
        raise DecodeError(f"malformed batch: {exc}") from exc
    for i, item in enumerate(items):
        if item.requester_key != key:
            raise DecodeError(f"malformed batch: item {i} is not the batch signer's request")
    return InferBatch(key, items, signature)


def decode_reply_batch(body: bytes) -> ReplyBatch:
    """Parse and validate an untrusted batch of replies; ``DecodeError`` says what is wrong."""
    obj = _parse(body, config.MAX_REPLY_BATCH_BODY, _BATCH_FIELDS["responder_id"], "reply batch")
    try:
        _get_int(obj, "version", *_INT_FIELDS["version"])
        responder = _get_str(obj, "responder_id", *_PEER_ID_RULE)
        signature = _get_b64(obj, "signature", SIGNATURE_LEN)
        items: list[InferReply | ItemError] = []
        for i, item in enumerate(_get_items(obj)):
            if type(item) is dict and "error" in item:
                items.append(_item_error(item, f"reply batch item {i}"))
            else:
                items.append(_values(item, InferReply, f"reply batch item {i}", _UNSIGNED))
    except _DECODE_ERRORS as exc:
        raise DecodeError(f"malformed reply batch: {exc}") from exc
    return ReplyBatch(responder, tuple(items), signature)


def _get_items(obj: dict[str, Any]) -> list[Any]:
    items = obj["items"]
    if type(items) is not list or not 1 <= len(items) <= config.MAX_BATCH_ITEMS:
        _bad("items", f"a list of 1 to {config.MAX_BATCH_ITEMS} messages", items)
    return items


def _item_error(obj: object, what: str) -> ItemError:
    if type(obj) is not dict:
        raise DecodeError(f"{what} must be a JSON object")
    _check_fields(obj, _ITEM_ERROR_FIELDS, what)
    message = obj["message"]
    if type(message) is not str or len(message) > _MAX_ERROR_MESSAGE:
        _bad("message", f"a string of at most {_MAX_ERROR_MESSAGE} characters", message)
    return ItemError(
        _get_str(obj, "request_id", *_STR_FIELDS["request_id"]),
        _get_str(obj, "error", _ERROR_CODE, "an error code of 1-40 of a-z and _"),
        message,
    )


def _decode(body: bytes, cls: type[_Msg], limit: int, what: str) -> _Msg:
    obj = _parse(body, limit, frozenset(_FIELD_NAMES[cls]), what)
    return _values(obj, cls, what)


def _values(
    obj: object,
    cls: type[_Msg],
    what: str,
    skip: frozenset[str] = frozenset(),
    *,
    ignore: frozenset[str] = frozenset(),
) -> _Msg:
    """The message ``cls`` from a parsed JSON object; fields in ``skip`` are absent and
    left empty (a batch item's signature); fields in ``ignore`` are checked, then left
    empty too (a batch item's own signature, which the batch's replaces)."""
    if type(obj) is not dict:
        raise DecodeError(f"{what} must be a JSON object, got {type(obj).__name__}")
    names = [n for n in _FIELD_NAMES[cls] if n not in skip]
    _check_fields(obj, frozenset(names), what)
    values: dict[str, Any] = dict.fromkeys(skip, b"")
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
            # NaN fails both comparisons, so two reductions check everything; which
            # rule failed is worked out only for the error message.
            if not (float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0):
                if not bool(np.all(np.isfinite(pixels))):
                    _bad("input", "finite float32 values", "NaN or infinity")
                _bad("input", "values in [0, 1] (pixel / 255)", "values outside it")
        for name in ignore:
            values[name] = b""
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
    _check_fields(obj, fields, what)
    return obj


def _check_fields(obj: dict[str, Any], fields: frozenset[str], what: str) -> None:
    missing = sorted(fields - obj.keys())
    unexpected = sorted(obj.keys() - fields)
    if missing:
        raise DecodeError(f"{what} lacks field(s) {', '.join(missing)}")
    if unexpected:
        raise DecodeError(f"{what} has unexpected field(s) {_brief(unexpected)}")


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
    if (
        type(value) is not str
        or not value.isascii()
        or len(value) != 4 * ((length + 2) // 3)
        or not _canonical_tail(value, length)
    ):
        _bad_b64(field, length, value)
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        _bad_b64(field, length, value)
    if len(raw) != length:
        _bad_b64(field, length, value)
    return raw


def _bad_b64(field: str, length: int, value: object) -> NoReturn:
    _bad(field, f"standard base64 of {length} bytes", value)


# The bits of the last base64 digit before the padding that no byte uses: 4 with "==",
# 2 with "=". Only the encoding with those bits zero is canonical (RFC 4648 section
# 3.5), so one text means one value: the check re-encoding would make, in O(1).
_B64_DIGITS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_SPARE_BITS: Final = {1: 0b1111, 2: 0b11}  # bytes in the last group -> mask


def _canonical_tail(value: str, length: int) -> bool:
    mask = _SPARE_BITS.get(length % 3)
    if mask is None:
        return True
    digit = _B64_DIGITS.find(value[-4 + length % 3])
    return digit >= 0 and digit & mask == 0


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
