"""The wire format of the peer links: msgpack arrays out, untrusted bytes in.

Every ``decode_*`` here is the one place its kind of message turns from bytes into a
message. Each bounds the size first, then every field's type, range and length, and raises
``DecodeError`` (never anything else) naming the field. Bools are not integers, floats and
maps appear nowhere, and bytes that decode with anything left over are refused.

Layouts (``VERSION`` 2), each a msgpack array whose first item is its kind:

    hello    [1, body, signature]   body: [version, swarm, family, requester_id,
                                           requester_key, exchange_key, issued_at_ms]
    welcome  [2, body, signature]   body: [version, responder_id, requester_id,
                                           hello_sha256, exchange_key, max_asks, issued_at_ms]
    asks     [3, exchange, [[request_id, k, deadline_ms, input], ...]]
    answers  [4, exchange, [reply | [request_id, code, message], ...], signature]
    reply    [version, swarm, family, request_id, requester_id, input_sha256, responder_id,
              variant, model_sha256, [[class, ppm], ...], issued_at_ms, infer_us]

Ids and digests travel as raw bytes (family and request ids 16, digests 32), names and
peer ids as strings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

import msgpack
import numpy.typing as npt

from swarm import PROTOCOL_VERSION, config
from swarm.crypto.identity import PEER_ID_LEN, PUBLIC_KEY_LEN, SIGNATURE_LEN, Identity
from swarm.errors import DecodeError, MessageTooLargeError
from swarm.wire.messages import (
    MAX_DEADLINE_MS,
    NAME,
    PPM,
    REQUEST_ID_LEN,
    SHA256_LEN,
    Answers,
    Ask,
    Asks,
    InferReply,
    InferRequest,
    ItemError,
    LinkHello,
    LinkWelcome,
    ReplyBatch,
    reply_batch_signed_bytes,
    topk_from_probs,
    unix_ms,
)

HELLO: Final = 1
WELCOME: Final = 2
ASKS: Final = 3
ANSWERS: Final = 4

_MAX_INT: Final = 2**53 - 1  # any field's ceiling: every language's JSON and msgpack agree
MAX_HANDSHAKE: Final = 1024  # a hello or welcome: keys, ids, a signature
MAX_REPLY: Final = 512  # one encoded reply: ids, names, k pairs
MAX_ERROR_TEXT: Final = 300  # an item error's message, in characters
MAX_ERROR_CODE: Final = 40
_ASK_OVERHEAD: Final = 48  # an ask's bytes beside its input: array, id, k, deadline
_PEER_ID: Final = re.compile(f"[0-9a-f]{{{PEER_ID_LEN}}}")
_MAX_CLASS: Final = 65_535  # a class index; the family's own bound is the vote's check

# One packer: msgpack builds its buffer once, and the event loop packs one at a time.
_pack: Final[Callable[[object], bytes]] = msgpack.Packer(use_bin_type=True, autoreset=True).pack
# What msgpack raises on malformed input, besides its own hierarchy.
_MSGPACK_ERRORS: Final = (ValueError, TypeError, UnicodeDecodeError, msgpack.UnpackException)


def max_asks_size(input_len: int, items: int = config.MAX_BATCH_ITEMS) -> int:
    """The largest asks message of ``items`` inputs of ``input_len`` bytes each."""
    return 32 + items * (input_len + _ASK_OVERHEAD)


MAX_ANSWERS: Final = 64 + config.MAX_BATCH_ITEMS * (MAX_REPLY + 8) + SIGNATURE_LEN


# --- encoding ---------------------------------------------------------------------------


def hello_body(
    *,
    swarm: str,
    family: str,
    requester_id: str,
    requester_key: bytes,
    exchange_key: bytes,
    issued_at_ms: int,
) -> bytes:
    """The bytes a hello's signature covers (behind ``HELLO_TAG``)."""
    return _pack(
        [
            PROTOCOL_VERSION,
            swarm,
            bytes.fromhex(family),
            requester_id,
            requester_key,
            exchange_key,
            issued_at_ms,
        ]
    )


def welcome_body(
    *,
    responder_id: str,
    requester_id: str,
    hello_sha256: bytes,
    exchange_key: bytes,
    max_asks: int,
    issued_at_ms: int,
) -> bytes:
    """The bytes a welcome's signature covers (behind ``WELCOME_TAG``)."""
    return _pack(
        [
            PROTOCOL_VERSION,
            responder_id,
            requester_id,
            hello_sha256,
            exchange_key,
            max_asks,
            issued_at_ms,
        ]
    )


def encode_handshake(message: LinkHello | LinkWelcome) -> bytes:
    kind = HELLO if isinstance(message, LinkHello) else WELCOME
    return _pack([kind, message.body, message.signature])


def encode_asks(asks: Asks) -> bytes:
    return _pack(
        [
            ASKS,
            asks.exchange,
            [[bytes.fromhex(a.request_id), a.k, a.deadline_ms, a.input] for a in asks.items],
        ]
    )


def encode_reply(
    *,
    swarm: str,
    family: str,
    request_id: str,
    requester_id: str,
    input_sha256: str,
    responder_id: str,
    variant: str,
    model_sha256: str,
    topk: Sequence[tuple[int, int]],
    issued_at_ms: int,
    infer_us: int,
) -> bytes:
    """A reply's exact bytes: what its batch signature covers and what travels."""
    return _pack(
        [
            PROTOCOL_VERSION,
            swarm,
            bytes.fromhex(family),
            bytes.fromhex(request_id),
            requester_id,
            bytes.fromhex(input_sha256),
            responder_id,
            variant,
            bytes.fromhex(model_sha256),
            [list(pair) for pair in topk],
            issued_at_ms,
            infer_us,
        ]
    )


def encode_answers(answers: Answers) -> bytes:
    items: list[Any] = [
        i.raw
        if isinstance(i, InferReply)
        else [bytes.fromhex(i.request_id), i.error, i.message[:MAX_ERROR_TEXT]]
        for i in answers.batch.items
    ]
    return _pack([ANSWERS, answers.exchange, items, answers.batch.signature])


# --- decoding ---------------------------------------------------------------------------


def decode_hello(data: bytes) -> LinkHello:
    """A link's first message, from the requester; ``DecodeError`` names what is wrong."""
    body, signature = _handshake(data, HELLO, "hello")
    f = _fields(body, MAX_HANDSHAKE, 7, "hello")
    _version(f[0], "hello.version")
    return LinkHello(
        swarm=_name(f[1], "hello.swarm"),
        family=_bin(f[2], REQUEST_ID_LEN, "hello.family").hex(),
        requester_id=_peer_id(f[3], "hello.requester_id"),
        requester_key=_bin(f[4], PUBLIC_KEY_LEN, "hello.requester_key"),
        exchange_key=_bin(f[5], PUBLIC_KEY_LEN, "hello.exchange_key"),
        issued_at_ms=_int(f[6], 0, _MAX_INT, "hello.issued_at_ms"),
        body=body,
        signature=signature,
    )


def decode_welcome(data: bytes) -> LinkWelcome:
    """A link's second message, from the peer; ``DecodeError`` names what is wrong."""
    body, signature = _handshake(data, WELCOME, "welcome")
    f = _fields(body, MAX_HANDSHAKE, 7, "welcome")
    _version(f[0], "welcome.version")
    return LinkWelcome(
        responder_id=_peer_id(f[1], "welcome.responder_id"),
        requester_id=_peer_id(f[2], "welcome.requester_id"),
        hello_sha256=_bin(f[3], SHA256_LEN, "welcome.hello_sha256"),
        exchange_key=_bin(f[4], PUBLIC_KEY_LEN, "welcome.exchange_key"),
        max_asks=_int(f[5], 1, 1 << 20, "welcome.max_asks"),
        issued_at_ms=_int(f[6], 0, _MAX_INT, "welcome.issued_at_ms"),
        body=body,
        signature=signature,
    )


def decode_asks(data: bytes, *, input_len: int) -> Asks:
    """A group of asks whose inputs must be ``input_len`` bytes each (the family's
    compact input); ``DecodeError`` names what is wrong."""
    f = _fields(data, max_asks_size(input_len), 3, "asks")
    _kind(f[0], ASKS, "asks")
    exchange = _int(f[1], 0, _MAX_INT, "asks.exchange")
    items = _array(f[2], "asks.items")
    if not 1 <= len(items) <= config.MAX_BATCH_ITEMS:
        _bad("asks.items", f"1 to {config.MAX_BATCH_ITEMS} asks", f"{len(items)} asks")
    out = []
    for item in items:
        a = _array(item, "asks.item")
        if len(a) != 4:
            _bad("asks.item", "[request_id, k, deadline_ms, input]", f"{len(a)} fields")
        out.append(
            Ask(
                request_id=_bin(a[0], REQUEST_ID_LEN, "ask.request_id").hex(),
                k=_int(a[1], 1, config.MAX_TOP_K, "ask.k"),
                deadline_ms=_int(a[2], 1, MAX_DEADLINE_MS, "ask.deadline_ms"),
                input=_bin(a[3], input_len, "ask.input"),
            )
        )
    return Asks(exchange, tuple(out))


def decode_answers(data: bytes, *, responder_id: str) -> Answers:
    """A peer's answers to one group of asks; its replies are decoded too (``decode_reply``)."""
    f = _fields(data, MAX_ANSWERS, 4, "answers")
    _kind(f[0], ANSWERS, "answers")
    exchange = _int(f[1], 0, _MAX_INT, "answers.exchange")
    raw_items = _array(f[2], "answers.items")
    if not 1 <= len(raw_items) <= config.MAX_BATCH_ITEMS:
        _bad("answers.items", f"1 to {config.MAX_BATCH_ITEMS} items", f"{len(raw_items)}")
    items: list[InferReply | ItemError] = []
    for item in raw_items:
        if type(item) is bytes:
            items.append(_reply(item))
        else:
            items.append(_item_error(item))
    replies = any(isinstance(i, InferReply) for i in items)
    signature = _bin(f[3], SIGNATURE_LEN if replies else 0, "answers.signature")
    return Answers(exchange, ReplyBatch(responder_id, tuple(items), signature))


def decode_reply(raw: bytes) -> InferReply:
    """One reply from its exact bytes; ``DecodeError`` names what is wrong."""
    if type(raw) is not bytes:
        _bad("reply", "bytes", raw)
    return _reply(raw)


# A well-formed reply's field types, in order: checked at once before the fields' values.
_REPLY_TYPES: Final = (int, str, bytes, bytes, str, bytes, str, str, bytes, list, int, int)


def _reply(raw: bytes) -> InferReply:
    f = _fields(raw, MAX_REPLY, 12, "reply")
    # Every reply takes this path; one that fails any check takes the one below, which
    # names the first bad field.
    if (
        tuple(map(type, f)) == _REPLY_TYPES
        and f[0] == PROTOCOL_VERSION
        and len(f[2]) == len(f[3]) == REQUEST_ID_LEN
        and len(f[5]) == len(f[8]) == SHA256_LEN
        and _PEER_ID.fullmatch(f[4])
        and _PEER_ID.fullmatch(f[6])
        and NAME.fullmatch(f[1])
        and NAME.fullmatch(f[7])
        and 0 <= f[10] <= _MAX_INT
        and 0 <= f[11] <= _MAX_INT
    ):
        return InferReply(
            swarm=f[1],
            family=f[2].hex(),
            request_id=f[3].hex(),
            requester_id=f[4],
            input_sha256=f[5].hex(),
            responder_id=f[6],
            variant=f[7],
            model_sha256=f[8].hex(),
            topk=_topk(f[9]),
            issued_at_ms=f[10],
            infer_us=f[11],
            raw=raw,
        )
    _version(f[0], "reply.version")
    return InferReply(
        swarm=_name(f[1], "reply.swarm"),
        family=_bin(f[2], REQUEST_ID_LEN, "reply.family").hex(),
        request_id=_bin(f[3], REQUEST_ID_LEN, "reply.request_id").hex(),
        requester_id=_peer_id(f[4], "reply.requester_id"),
        input_sha256=_bin(f[5], SHA256_LEN, "reply.input_sha256").hex(),
        responder_id=_peer_id(f[6], "reply.responder_id"),
        variant=_name(f[7], "reply.variant"),
        model_sha256=_bin(f[8], SHA256_LEN, "reply.model_sha256").hex(),
        topk=_topk(f[9]),
        issued_at_ms=_int(f[10], 0, _MAX_INT, "reply.issued_at_ms"),
        infer_us=_int(f[11], 0, _MAX_INT, "reply.infer_us"),
        raw=raw,
    )


def _item_error(item: object) -> ItemError:
    a = _array(item, "answers.item")
    if len(a) != 3:
        _bad("answers.item", "a reply (bytes) or [request_id, code, message]", f"{len(a)} fields")
    return ItemError(
        request_id=_bin(a[0], REQUEST_ID_LEN, "item_error.request_id").hex(),
        error=_text(a[1], MAX_ERROR_CODE, "item_error.error"),
        message=_text(a[2], MAX_ERROR_TEXT, "item_error.message"),
    )


def _handshake(data: bytes, kind: int, what: str) -> tuple[bytes, bytes]:
    f = _fields(data, MAX_HANDSHAKE + SIGNATURE_LEN + 16, 3, what)
    _kind(f[0], kind, what)
    return _bin(f[1], None, f"{what}.body"), _bin(f[2], SIGNATURE_LEN, f"{what}.signature")


def _fields(data: bytes, limit: int, count: int, what: str) -> list[Any]:
    """``data`` as a msgpack array of ``count`` items, within ``limit`` bytes."""
    if type(data) is not bytes:
        _bad(what, "bytes", data)
    if len(data) > limit:
        raise MessageTooLargeError(f"{what}: {len(data)} bytes, the limit is {limit}")
    try:
        # No maps or extension types anywhere; strings and arrays bounded by the message.
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_map_len=0,
            max_ext_len=0,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
        )
    except _MSGPACK_ERRORS as exc:
        raise DecodeError(f"{what}: not one msgpack value: {type(exc).__name__}: {exc}") from None
    if type(obj) is not list:
        _bad(what, "an array", obj)
    if len(obj) != count:
        _bad(what, f"an array of {count} fields", f"{len(obj)} fields")
    return obj


def _kind(value: object, kind: int, what: str) -> None:
    if type(value) is not int or value != kind:
        _bad(f"{what}.kind", f"{kind} ({what})", value)


def _version(value: object, field: str) -> None:
    if type(value) is not int or value != PROTOCOL_VERSION:
        _bad(field, f"protocol version {PROTOCOL_VERSION}", value)


def _int(value: object, lo: int, hi: int, field: str) -> int:
    if type(value) is not int:  # bool is a subclass of int: refused here
        _bad(field, f"an integer in [{lo}, {hi}]", value)
    if not lo <= value <= hi:
        _bad(field, f"an integer in [{lo}, {hi}]", value)
    return value


def _bin(value: object, length: int | None, field: str) -> bytes:
    if type(value) is not bytes:
        _bad(field, "bytes" if length is None else f"{length} bytes", value)
    if length is not None and len(value) != length:
        _bad(field, f"{length} bytes", f"{len(value)} bytes")
    return value


def _array(value: object, field: str) -> list[Any]:
    if type(value) is not list:
        _bad(field, "an array", value)
    return value


def _name(value: object, field: str) -> str:
    if type(value) is not str or NAME.fullmatch(value) is None:
        _bad(field, "a name of 1-63 of A-Za-z0-9._-", value)
    return value


def _peer_id(value: object, field: str) -> str:
    if type(value) is not str or _PEER_ID.fullmatch(value) is None:
        _bad(field, f"a peer id ({PEER_ID_LEN} lowercase hex characters)", value)
    return value


def _text(value: object, limit: int, field: str) -> str:
    if type(value) is not str or len(value) > limit:
        _bad(field, f"a string of at most {limit} characters", value)
    return value


def _topk(value: object) -> tuple[tuple[int, int], ...]:
    pairs = _array(value, "reply.topk")
    if 1 <= len(pairs) <= config.MAX_TOP_K and all(
        type(p) is list
        and len(p) == 2
        and type(p[0]) is int
        and type(p[1]) is int
        and 0 <= p[0] <= _MAX_CLASS
        and 0 <= p[1] <= PPM
        for p in pairs
    ):
        return tuple((p[0], p[1]) for p in pairs)
    if not 1 <= len(pairs) <= config.MAX_TOP_K:
        _bad("reply.topk", f"1 to {config.MAX_TOP_K} pairs", f"{len(pairs)} pairs")
    out = []
    for pair in pairs:
        p = _array(pair, "reply.topk")
        if len(p) != 2:
            _bad("reply.topk", "[class, ppm] pairs", p)
        out.append(
            (_int(p[0], 0, _MAX_CLASS, "reply.topk.class"), _int(p[1], 0, PPM, "reply.topk.ppm"))
        )
    return tuple(out)


def _bad(field: str, expected: str, got: object) -> NoReturn:
    raise DecodeError(f"{field}: expected {expected}, got {_brief(got)}")


def _brief(value: object, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, str) or value.startswith("'") else value
    return text if len(text) <= limit else text[:limit] + "..."


# --- building replies -------------------------------------------------------------------


def build_reply(
    request: InferRequest,
    *,
    responder_id: str,
    variant: str,
    model_sha256: str,
    probs: npt.ArrayLike,
    infer_us: int,
    k: int | None = None,
    now_ms: int | None = None,
) -> InferReply:
    """A peer's top-k answer to ``request``, encoded once (``raw``); unsigned until its
    batch is (``sign_replies``)."""
    top = request.k if k is None else k
    if not 1 <= top <= request.k:
        raise ValueError(f"k must be in [1, {request.k}] (what the request asked), got {top}")
    fields: dict[str, Any] = {
        "swarm": request.swarm,
        "family": request.family,
        "request_id": request.request_id,
        "requester_id": request.requester_id,
        "input_sha256": request.input_sha256,
        "responder_id": responder_id,
        "variant": variant,
        "model_sha256": model_sha256,
        "topk": topk_from_probs(probs, top),
        "issued_at_ms": unix_ms() if now_ms is None else now_ms,
        "infer_us": max(0, infer_us),
    }
    return InferReply(**fields, raw=encode_reply(**fields))


def sign_replies(identity: Identity, items: Sequence[InferReply | ItemError]) -> ReplyBatch:
    """``items`` as one batch whose replies ``identity`` signs once (no signature when
    every item is an error: an error is not evidence)."""
    digests = [i.digest() for i in items if isinstance(i, InferReply)]
    signature = identity.sign(reply_batch_signed_bytes(digests)) if digests else b""
    return ReplyBatch(identity.peer_id, tuple(items), signature)
