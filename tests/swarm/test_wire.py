"""Tests of swarm.wire: the link messages, their exact bytes, and the one decoder of each.

Every decoder takes hostile bytes: whatever arrives, it returns a well-formed message or
raises ``DecodeError`` naming the field, never anything else (fuzzed with hypothesis).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm import PROTOCOL_VERSION, config
from swarm.crypto.identity import Identity, verify_signature
from swarm.errors import DecodeError, MessageTooLargeError
from swarm.wire import codec
from swarm.wire.messages import (
    BATCH_REPLY_TAG,
    REPLY_TAG,
    Answers,
    Ask,
    Asks,
    InferReply,
    ItemError,
    build_request,
    pixels_from,
    topk_from_probs,
)
from tests.swarm.signed import FAMILY, MODEL_SHA, NOW

FUZZ = settings(max_examples=300, deadline=None)
INPUT_LEN = 784


def pack(obj: object) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def asks_of(n: int = 2) -> Asks:
    return Asks(
        7,
        tuple(Ask(f"{i:032x}", 2, 1500, bytes([i]) * INPUT_LEN) for i in range(n)),
    )


# --- requests and inputs ----------------------------------------------------------------


def test_a_request_carries_its_input_compact(requester: Identity) -> None:
    """A float image in [0, 1] travels as its uint8 pixels, hashed as sent."""
    x = np.linspace(0.0, 1.0, INPUT_LEN, dtype=np.float32).reshape(config.INPUT_SHAPE)
    req = build_request(
        swarm="lab", family=FAMILY, requester_id=requester.peer_id, tensor=x, deadline_ms=10
    )
    assert len(req.input) == INPUT_LEN
    assert req.input_sha256 == hashlib.sha256(req.input).hexdigest()
    np.testing.assert_allclose(req.tensor(), x, atol=0.5 / 255)
    assert req.tensor().dtype == np.float32


def test_uint8_pixels_travel_exactly() -> None:
    """uint8 pixels are sent as they are."""
    pixels = np.arange(INPUT_LEN, dtype=np.uint32).astype(np.uint8).reshape(config.INPUT_SHAPE)
    assert pixels_from(pixels, config.INPUT_SHAPE) == pixels.tobytes()


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((28, 28), np.float32),  # no channel axis
        np.full(config.INPUT_SHAPE, 1.5, np.float32),
        np.full(config.INPUT_SHAPE, np.nan, np.float32),
        np.zeros(config.INPUT_SHAPE, np.int64),
    ],
)
def test_a_bad_input_is_a_value_error(bad: np.ndarray[Any, Any]) -> None:
    """Shapes, ranges and dtypes other than the family's input are refused with why."""
    with pytest.raises(ValueError, match="input"):
        pixels_from(bad, config.INPUT_SHAPE)


@pytest.mark.parametrize(
    "kw",
    [
        {"swarm": "bad name"},
        {"family": "xyz"},
        {"k": 0},
        {"k": config.MAX_TOP_K + 1},
        {"deadline_ms": 0},
        {"request_id": "abc"},
    ],
)
def test_build_request_refuses_bad_fields(requester: Identity, kw: dict[str, Any]) -> None:
    """build_request says which field is wrong."""
    args: dict[str, Any] = {
        "swarm": "lab",
        "family": FAMILY,
        "requester_id": requester.peer_id,
        "tensor": np.zeros(config.INPUT_SHAPE, np.uint8),
        "deadline_ms": 10,
    } | kw
    with pytest.raises(ValueError, match=next(iter(kw)).split("_")[0]):
        build_request(**args)


# --- replies ----------------------------------------------------------------------------


def test_reply_round_trips_through_its_exact_bytes(reply_msg: InferReply) -> None:
    """A reply decodes from its bytes to itself, and those bytes are what was encoded."""
    decoded = codec.decode_reply(reply_msg.raw)
    assert decoded == reply_msg
    assert decoded.raw == reply_msg.raw
    assert decoded.topk == ((1, 600_000), (3, 250_000))


def test_batch_signature_covers_the_exact_reply_bytes(
    responder: Identity, reply_msg: InferReply
) -> None:
    """The signature is over the tag and each reply's digest, checkable by a third party."""
    batch = codec.sign_replies(responder, [reply_msg])
    digest = hashlib.sha256(REPLY_TAG + reply_msg.raw).digest()
    assert batch.signed_bytes() == BATCH_REPLY_TAG + digest
    assert verify_signature(responder.public_key, batch.signature, BATCH_REPLY_TAG + digest)


def test_a_batch_of_errors_only_is_unsigned(responder: Identity) -> None:
    """An error is not evidence: a batch without replies carries no signature."""
    batch = codec.sign_replies(responder, [ItemError("0" * 32, "overloaded", "busy")])
    assert batch.signature == b""


def test_answers_round_trip_with_replies_and_errors(
    responder: Identity, reply_msg: InferReply
) -> None:
    """An answers message keeps its items' order, kinds and signature."""
    batch = codec.sign_replies(responder, [reply_msg, ItemError("1" * 32, "overloaded", "busy")])
    data = codec.encode_answers(Answers(3, batch))
    got = codec.decode_answers(data, responder_id=responder.peer_id)
    assert got.exchange == 3
    assert got.batch.items == batch.items
    assert got.batch.signature == batch.signature


def test_asks_round_trip() -> None:
    """Asks decode to what was sent."""
    asks = asks_of(3)
    assert codec.decode_asks(codec.encode_asks(asks), input_len=INPUT_LEN) == asks


def test_topk_from_probs_rounds_to_ppm_and_breaks_ties_low() -> None:
    """Top-k as (class, ppm), most probable first, ties to the lower class."""
    probs = np.array([0.25, 0.25, 0.5, 0, 0, 0, 0, 0, 0, 0], np.float32)
    assert topk_from_probs(probs, 2) == ((2, 500_000), (0, 250_000))


# --- decoding hostile bytes --------------------------------------------------------------


def reply_fields(**changes: Any) -> list[Any]:
    fields: list[Any] = [
        PROTOCOL_VERSION,
        "lab",
        bytes.fromhex(FAMILY),
        b"\x01" * 16,
        "a" * 20,
        b"\x02" * 32,
        "b" * 20,
        "V1",
        bytes.fromhex(MODEL_SHA),
        [[1, 600_000]],
        NOW,
        10,
    ]
    names = [
        "version", "swarm", "family", "request_id", "requester_id", "input_sha256",
        "responder_id", "variant", "model_sha256", "topk", "issued_at_ms", "infer_us",
    ]  # fmt: skip
    for name, value in changes.items():
        fields[names.index(name)] = value
    return fields


def test_valid_reply_fields_decode() -> None:
    """The reference layout of the bad-field tests decodes."""
    assert codec.decode_reply(pack(reply_fields())).variant == "V1"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", 1),
        ("version", True),
        ("swarm", "no spaces"),
        ("family", b"\x00" * 15),
        ("request_id", "00" * 16),
        ("requester_id", "A" * 20),
        ("input_sha256", b"\x00" * 31),
        ("variant", ""),
        ("topk", []),
        ("topk", [[1]]),
        ("topk", [[True, 5]]),
        ("topk", [[1, 1_000_001]]),
        ("topk", [[1, 2.5]]),
        ("issued_at_ms", -1),
        ("issued_at_ms", False),
        ("infer_us", 2**60),
    ],
)
def test_a_bad_reply_field_is_a_decode_error_naming_it(field: str, value: object) -> None:
    """Each field's type, range and length is checked; bools are not integers."""
    with pytest.raises(DecodeError, match=f"reply.{field}"):
        codec.decode_reply(pack(reply_fields(**{field: value})))


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (pack([]), "array of 12"),
        (pack([*reply_fields(), 1]), "array of 12"),
        (pack({"a": 1}), "msgpack|array"),
        (pack(reply_fields()) + b"\x00", "msgpack"),
        (b"\xc1", "msgpack"),
        (b"", "msgpack"),
    ],
)
def test_malformed_reply_bytes_are_decode_errors(data: bytes, what: str) -> None:
    """Wrong arity, maps, trailing bytes and invalid msgpack are refused."""
    with pytest.raises(DecodeError, match=what):
        codec.decode_reply(data)


def test_an_oversized_message_is_refused_before_decoding() -> None:
    """Size is bounded first, from the family's input size."""
    big = codec.encode_asks(asks_of(2))
    with pytest.raises(MessageTooLargeError):
        codec.decode_asks(big + b"\x00" * codec.max_asks_size(INPUT_LEN), input_len=INPUT_LEN)
    with pytest.raises(DecodeError, match=r"ask\.input"):
        codec.decode_asks(big, input_len=INPUT_LEN - 1)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ([codec.ASKS, 1, []], "asks.items"),
        ([codec.ASKS, 1, [[b"\x00" * 16, 2, 10, b"\x00"]] * 33], "asks.items"),
        ([codec.ASKS, -1, [[b"\x00" * 16, 2, 10, b"\x00" * INPUT_LEN]]], "asks.exchange"),
        ([codec.ASKS, 1, [[b"\x00" * 16, 0, 10, b"\x00" * INPUT_LEN]]], "ask.k"),
        ([codec.ASKS, 1, [[b"\x00" * 16, 2, 60_001, b"\x00" * INPUT_LEN]]], "ask.deadline_ms"),
        ([codec.ANSWERS, 1, [[b"\x00" * 16, 2, 10, b""]]], "asks.kind"),
    ],
)
def test_bad_asks_are_decode_errors_naming_the_field(message: list[Any], field: str) -> None:
    """Asks are bounded in count, ranges and input length."""
    with pytest.raises(DecodeError, match=field):
        codec.decode_asks(pack(message), input_len=INPUT_LEN)


def test_answers_with_replies_need_a_signature(reply_msg: InferReply) -> None:
    """A group with replies and no signature is refused as malformed."""
    data = pack([codec.ANSWERS, 1, [reply_msg.raw], b""])
    with pytest.raises(DecodeError, match=r"answers\.signature"):
        codec.decode_answers(data, responder_id="b" * 20)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_every_decoder_raises_only_decode_errors(data: bytes) -> None:
    """Arbitrary bytes: a message or a DecodeError, from every decoder."""
    for decode in (
        codec.decode_hello,
        codec.decode_welcome,
        codec.decode_reply,
        lambda d: codec.decode_asks(d, input_len=INPUT_LEN),
        lambda d: codec.decode_answers(d, responder_id="b" * 20),
    ):
        with contextlib.suppress(DecodeError):
            decode(data)


_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(st.data())
def test_fuzz_near_valid_messages_decode_or_name_a_field(data: st.DataObject) -> None:
    """A valid reply or asks with one item replaced by any msgpack value: a well-formed
    message or a DecodeError, never another exception."""
    reply = reply_fields()
    reply[data.draw(st.integers(0, len(reply) - 1))] = data.draw(_MSGPACK_VALUES)
    with contextlib.suppress(DecodeError):
        codec.decode_reply(pack(reply))
    ask: list[Any] = [b"\x00" * 16, 2, 10, b"\x00" * INPUT_LEN]
    ask[data.draw(st.integers(0, 3))] = data.draw(_MSGPACK_VALUES)
    with contextlib.suppress(DecodeError):
        codec.decode_asks(pack([codec.ASKS, 1, [ask]]), input_len=INPUT_LEN)


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, config.NUM_CLASSES - 1), st.integers(0, 1_000_000)),
        min_size=1,
        max_size=config.MAX_TOP_K,
    ),
    st.integers(0, 2**53 - 1),
)
def test_fuzz_replies_round_trip(topk: list[tuple[int, int]], issued: int) -> None:
    """Any reply the codec can build decodes back to itself."""
    fields: dict[str, Any] = {
        "swarm": "lab",
        "family": FAMILY,
        "request_id": "0f" * 16,
        "requester_id": "d" * 20,
        "input_sha256": "e" * 64,
        "responder_id": "c" * 20,
        "variant": "V2",
        "model_sha256": MODEL_SHA,
        "topk": tuple(topk),
        "issued_at_ms": issued,
        "infer_us": 5,
    }
    raw = codec.encode_reply(**fields)
    assert codec.decode_reply(raw) == InferReply(**fields, raw=raw)
