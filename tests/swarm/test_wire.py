"""Tests of the wire format: canonical bytes, building, decoding hostile bytes."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm import PROTOCOL_VERSION, config
from swarm.crypto.identity import Identity, verify_signature
from swarm.errors import DecodeError, MessageTooLargeError
from swarm.wire import messages
from swarm.wire.codec import (
    REPLY_TAG,
    REQUEST_TAG,
    InferReply,
    InferRequest,
    ItemError,
    build_batch,
    build_reply,
    build_request,
    canonical_json,
    decode_batch,
    decode_reply,
    decode_reply_batch,
    decode_request,
    encode_batch,
    encode_reply,
    encode_reply_batch,
    encode_request,
    sign_replies,
    signed_reply_batch,
    tensor_bytes,
    topk_from_probs,
)
from tests.swarm.signed import MODEL_SHA, NOW

FUZZ = settings(max_examples=300, deadline=None)


def _body(msg: bytes) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(msg)
    return out


# --- canonical JSON -------------------------------------------------------------------


def test_canonical_json_sorts_keys_without_whitespace() -> None:
    """Keys are sorted, separators carry no spaces, nesting is preserved."""
    assert canonical_json({"b": [1, True, None], "a": {"d": "x", "c": -5}}) == (
        b'{"a":{"c":-5,"d":"x"},"b":[1,true,null]}'
    )


def test_canonical_json_writes_utf8_and_rfc8785_escapes() -> None:
    """Non-ASCII is raw UTF-8; control characters use RFC 8785's escapes."""
    assert canonical_json('é€\n\x01"\\/') == '"é€\\n\\u0001\\"\\\\/"'.encode()


def test_canonical_json_orders_keys_by_utf16_code_units() -> None:
    """RFC 8785 3.2.3: U+1F600 (UTF-16 D83D...) sorts before U+E000."""
    assert canonical_json({"\ue000": 1, "\U0001f600": 2}) == '{"😀":2,"\ue000":1}'.encode()


@pytest.mark.parametrize(
    "value",
    [0.5, 1e6, float("nan"), {"p": 0.25}, [1.0], np.float32(0.5)],
)
def test_canonical_json_refuses_floats(value: object) -> None:
    """Floats anywhere are refused with a message pointing at ppm integers."""
    with pytest.raises(TypeError, match="floats are not allowed"):
        canonical_json(value)


@pytest.mark.parametrize("value", [(1, 2), b"raw", {1: "x"}, np.int64(3), {"a": {1, 2}}])
def test_canonical_json_refuses_other_types(value: object) -> None:
    """Only dict, list, str, int, bool and None are accepted."""
    with pytest.raises(TypeError):
        canonical_json(value)


def test_canonical_json_refuses_unsafe_integers_and_lone_surrogates() -> None:
    """Integers beyond 2**53 - 1 and invalid Unicode cannot be signed canonically."""
    with pytest.raises(ValueError, match="2\\*\\*53"):
        canonical_json(2**53)
    with pytest.raises(ValueError, match="surrogate"):
        canonical_json("\ud800")


_SIGNER = Identity.from_seed(b"\x05" * 32)
REQUEST = build_request(
    _SIGNER, swarm="lab", tensor=np.zeros(config.INPUT_SHAPE, np.float32), deadline_ms=9, now_ms=NOW
)
REPLY = build_reply(
    _SIGNER,
    REQUEST,
    variant="V1",
    model_sha256=MODEL_SHA,
    probs=np.full(config.NUM_CLASSES, 0.1, np.float32),
    infer_us=5,
    now_ms=NOW,
)
_UNSAFE = st.one_of(st.integers(), st.booleans(), st.just(2**53), st.just(-(2**53)))


@settings(max_examples=300, deadline=None)
@given(
    topk=st.lists(st.tuples(_UNSAFE, _UNSAFE), max_size=4),
    flat=st.lists(_UNSAFE, max_size=4),
    signature=st.binary(max_size=64),
)
def test_message_json_is_the_canonical_json_of_the_payload(
    topk: list[tuple[Any, Any]], flat: list[Any], signature: bytes
) -> None:
    """The messages' own encoder writes, or refuses, exactly what ``canonical_json`` of
    the message's fields does: tuples of integers (top-k pairs, a shape) included, with
    booleans and integers past 2**53 - 1 among them."""
    reply = dataclasses.replace(REPLY, topk=tuple(topk), signature=signature)
    request = dataclasses.replace(REQUEST, input_shape=tuple(flat))
    for msg in (reply, request):
        for skip in (frozenset(), frozenset({"signature"})):
            try:
                expected: bytes | type[Exception] = canonical_json(messages._payload(msg, skip))
            except (TypeError, ValueError) as exc:
                expected = type(exc)
            if isinstance(expected, bytes):
                assert messages._message_json(msg, skip) == expected
            else:
                with pytest.raises(expected):
                    messages._message_json(msg, skip)


# --- top-k ----------------------------------------------------------------------------


def test_topk_from_probs_orders_and_rounds_to_ppm() -> None:
    """Top-k is most probable first, in rounded parts per million."""
    probs = [0.1, 0.2000004, 0.0, 0.6999996]
    assert topk_from_probs(probs, 2) == ((3, 700_000), (1, 200_000))
    assert topk_from_probs(probs, 1) == ((3, 700_000),)


def test_topk_from_probs_breaks_ties_by_lower_class() -> None:
    """Equal probabilities keep the lower class index first."""
    assert topk_from_probs([0.25, 0.25, 0.25, 0.25], 3) == (
        (0, 250_000),
        (1, 250_000),
        (2, 250_000),
    )


def test_topk_from_probs_scales_down_float32_overshoot() -> None:
    """A softmax summing to slightly above 1 never yields more than 1e6 ppm in total."""
    probs = np.full(10, 0.1000001, dtype=np.float32)
    assert sum(ppm for _, ppm in topk_from_probs(probs, 10)) <= 1_000_000 + 5


@pytest.mark.parametrize(
    ("probs", "k", "match"),
    [
        ([0.5, 0.5], 0, "k must be"),
        ([0.5, 0.5], 3, "k must be"),
        ([np.nan, 0.5], 1, "finite"),
        ([-0.1, 0.5], 1, "non-negative"),
        ([0.9, 0.9], 1, "sum to 1"),
        ([[0.5, 0.5]], 1, "one vector"),
    ],
)
def test_topk_from_probs_rejects_bad_input(probs: list[float], k: int, match: str) -> None:
    """Out-of-range k, NaN, negative or non-softmax vectors are refused."""
    with pytest.raises(ValueError, match=match):
        topk_from_probs(probs, k)


# --- building and round trips ---------------------------------------------------------


def test_request_roundtrips_through_bytes(request_msg: InferRequest, tensor: np.ndarray) -> None:
    """encode then decode gives back an equal request and the same tensor."""
    decoded = decode_request(encode_request(request_msg))
    assert decoded == request_msg
    np.testing.assert_array_equal(decoded.tensor(), tensor)
    assert decoded.tensor().dtype == np.float32


def test_request_fields_are_set_and_signed(
    request_msg: InferRequest, requester: Identity, tensor: np.ndarray
) -> None:
    """build_request fills ids, key, input hash and a signature over the tagged bytes."""
    assert request_msg.version == PROTOCOL_VERSION
    assert request_msg.requester_id == requester.peer_id
    assert request_msg.input_sha256 == hashlib.sha256(tensor.astype("<f4").tobytes()).hexdigest()
    assert len(request_msg.request_id) == 32
    signed = request_msg.signed_bytes()
    assert signed.startswith(REQUEST_TAG)
    assert verify_signature(requester.public_key, request_msg.signature, signed)


def test_request_ids_are_random(requester: Identity, tensor: np.ndarray) -> None:
    """Two requests for the same input get different ids."""
    a = build_request(requester, swarm="lab", tensor=tensor, deadline_ms=100)
    b = build_request(requester, swarm="lab", tensor=tensor, deadline_ms=100)
    assert a.request_id != b.request_id


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"swarm": "has space"}, "swarm name"),
        ({"swarm": "x" * 64}, "swarm name"),
        ({"k": 0}, "k must be"),
        ({"k": config.MAX_TOP_K + 1}, "k must be"),
        ({"deadline_ms": 0}, "deadline_ms"),
        ({"request_id": "ABC"}, "request_id"),
        ({"tensor": np.zeros((28, 28), dtype=np.float32)}, "shape"),
        ({"tensor": np.full(config.INPUT_SHAPE, 2.0, dtype=np.float32)}, r"\[0, 1\]"),
        ({"tensor": np.zeros(config.INPUT_SHAPE, dtype=np.uint8)}, "dtype"),
    ],
)
def test_build_request_rejects_bad_arguments(
    requester: Identity, tensor: np.ndarray, kwargs: dict[str, Any], match: str
) -> None:
    """Bad names, k, deadlines, ids and tensors are refused before signing."""
    args: dict[str, Any] = {"swarm": "lab", "tensor": tensor, "k": 2, "deadline_ms": 100}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_request(requester, **args)


def test_reply_roundtrips_through_bytes(reply_msg: InferReply, responder: Identity) -> None:
    """encode then decode gives back an equal reply, signed over the tagged bytes."""
    assert decode_reply(encode_reply(reply_msg)) == reply_msg
    assert reply_msg.topk == ((1, 600_000), (3, 250_000))
    assert reply_msg.topk_probabilities() == ((1, 0.6), (3, 0.25))
    assert reply_msg.signed_bytes().startswith(REPLY_TAG)
    assert verify_signature(responder.public_key, reply_msg.signature, reply_msg.signed_bytes())


def test_reply_refuses_k_above_request(responder: Identity, request_msg: InferRequest) -> None:
    """A reply cannot carry more classes than the request asked for."""
    with pytest.raises(ValueError, match="k must be"):
        build_reply(
            responder,
            request_msg,
            variant="v",
            model_sha256=MODEL_SHA,
            probs=np.full(10, 0.1),
            k=3,
            infer_us=1,
        )


def test_request_signature_does_not_verify_as_reply(
    request_msg: InferRequest, requester: Identity
) -> None:
    """Domain separation: a request's signature is not valid over reply-tagged bytes."""
    payload = request_msg.signed_bytes()[len(REQUEST_TAG) :]
    assert not verify_signature(requester.public_key, request_msg.signature, REPLY_TAG + payload)


def test_encoded_body_is_canonical(request_msg: InferRequest) -> None:
    """The body on the wire is itself canonical JSON with base64 binary fields."""
    body = encode_request(request_msg)
    assert canonical_json(_body(body)) == body
    assert base64.b64decode(_body(body)["signature"]) == request_msg.signature


# --- decoding hostile bytes -----------------------------------------------------------


def test_decode_rejects_oversized_bodies() -> None:
    """Bodies over the configured limits raise MessageTooLargeError before parsing."""
    with pytest.raises(MessageTooLargeError):
        decode_request(b" " * (config.MAX_INFER_BODY + 1))
    with pytest.raises(MessageTooLargeError):
        decode_reply(b" " * (config.MAX_REPLY_BODY + 1))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b.pop("k"), "lacks field"),
        (lambda b: b.update(extra=1), "unexpected field"),
        (lambda b: b.update(k=0), "'k'"),
        (lambda b: b.update(k=True), "'k'"),
        (lambda b: b.update(swarm=""), "'swarm'"),
        (lambda b: b.update(request_id="A" * 32), "'request_id'"),
        (lambda b: b.update(requester_id="xyz"), "'requester_id'"),
        (lambda b: b.update(requester_key="AAAA"), "'requester_key'"),
        (lambda b: b.update(input_shape=[1, 1, 28, 28]), "'input_shape'"),
        (lambda b: b.update(input=base64.b64encode(b"\0" * 3132).decode()), "'input'"),
        (lambda b: b.update(signature="!" * 88), "'signature'"),
        (lambda b: b.update(deadline_ms=10**9), "'deadline_ms'"),
        (lambda b: b.update(issued_at_ms=-1), "'issued_at_ms'"),
        (lambda b: b.update(version=2), "protocol version 2"),
    ],
)
def test_decode_request_names_the_wrong_field(
    request_msg: InferRequest, mutate: Any, match: str
) -> None:
    """Each malformed field raises DecodeError saying which field and what is expected."""
    body = _body(encode_request(request_msg))
    mutate(body)
    with pytest.raises(DecodeError, match=match):
        decode_request(json.dumps(body).encode())


def _spare_bits_set(text: str) -> str:
    """``text`` (base64 ending in padding) with its last digit's unused bits set: the
    same bytes under strict decoding, but not the canonical text (RFC 4648 3.5)."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    pos = len(text.rstrip("=")) - 1
    mask = 0b1111 if text.endswith("==") else 0b11
    return text[:pos] + digits[digits.index(text[pos]) | mask] + text[pos + 1 :]


@pytest.mark.parametrize("field", ["requester_key", "signature"])
def test_decode_request_refuses_non_canonical_base64(request_msg: InferRequest, field: str) -> None:
    """One value has one text: base64 whose unused bits are set decodes to the same bytes
    but is refused, so a signed message cannot travel in two spellings."""
    body = _body(encode_request(request_msg))
    text = body[field]
    assert text.endswith("=")  # 32 and 64 bytes leave spare bits
    twin = _spare_bits_set(text)
    assert base64.b64decode(twin, validate=True) == base64.b64decode(text)
    body[field] = twin
    with pytest.raises(DecodeError, match=f"'{field}'"):
        decode_request(json.dumps(body).encode())
    body[field] = text
    assert decode_request(json.dumps(body).encode()) == request_msg


@pytest.mark.parametrize(
    ("pixels", "match"),
    [(np.float32(np.nan), "finite"), (np.float32(1.5), r"\[0, 1\]"), (np.float32(-1), r"\[0, 1\]")],
)
def test_decode_request_rejects_bad_pixels(
    request_msg: InferRequest, pixels: np.float32, match: str
) -> None:
    """NaN, infinite or out-of-range pixels are refused at decode."""
    raw = np.frombuffer(request_msg.input, dtype="<f4").copy()
    raw[17] = pixels
    body = _body(encode_request(request_msg))
    body["input"] = base64.b64encode(raw.tobytes()).decode()
    with pytest.raises(DecodeError, match=match):
        decode_request(json.dumps(body).encode())


@pytest.mark.parametrize(
    ("topk", "match"),
    [
        ([], "topk"),
        ([[10, 5]], "topk"),
        ([[1, 1_000_001]], "topk"),
        ([[1, 5, 6]], "topk"),
        ([[1, 0.5]], "floats"),
        ([[1, 5]] * 11, "topk"),
        ("1,5", "topk"),
    ],
)
def test_decode_reply_rejects_bad_topk(reply_msg: InferReply, topk: object, match: str) -> None:
    """Malformed top-k lists are refused with the field named."""
    body = _body(encode_reply(reply_msg))
    body["topk"] = topk
    with pytest.raises(DecodeError, match=match):
        decode_reply(json.dumps(body).encode())


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"null",
        b"\xff\xfe{}",
        b'{"version": 1, "version": 1}',
        b'{"version": NaN}',
        b"[" * 50_000,
        b'{"version": 1' + b"9" * 5000 + b"}",
    ],
)
def test_decode_rejects_non_message_bytes(raw: bytes) -> None:
    """Non-JSON, non-objects, duplicate keys, NaN, deep nesting: DecodeError only."""
    with pytest.raises(DecodeError):
        decode_request(raw)
    with pytest.raises(DecodeError):
        decode_reply(raw[: config.MAX_REPLY_BODY])


@FUZZ
@given(st.binary(max_size=512))
def test_decode_random_bytes_raises_only_decode_error(raw: bytes) -> None:
    """No byte string makes decode_* raise anything but DecodeError."""
    for decode in (decode_request, decode_reply):
        with contextlib.suppress(DecodeError):
            decode(raw)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@FUZZ
@given(data=st.data())
def test_decode_mutated_messages_raises_only_decode_error(data: st.DataObject) -> None:
    """Valid messages with fields deleted or replaced by any JSON: DecodeError or a message."""
    requester, responder = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
    tensor = np.full(config.INPUT_SHAPE, 0.5, dtype=np.float32)
    req = build_request(requester, swarm="lab", tensor=tensor, deadline_ms=50, now_ms=NOW)
    reply = build_reply(
        responder, req, variant="v", model_sha256=MODEL_SHA, probs=np.full(10, 0.1), infer_us=1
    )
    for body, decode in (
        (encode_request(req), decode_request),
        (encode_reply(reply), decode_reply),
    ):
        obj = _body(body)
        for key in data.draw(st.lists(st.sampled_from(sorted(obj)), max_size=3)):
            if data.draw(st.booleans()):
                obj.pop(key, None)
            else:
                obj[key] = data.draw(_JSON)
        with contextlib.suppress(DecodeError):
            decode(json.dumps(obj).encode())


# --- batches ---------------------------------------------------------------------------


def _batch_pair() -> tuple[Identity, Identity, list[InferRequest]]:
    requester, responder = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
    reqs = [
        build_request(
            requester,
            swarm="lab",
            tensor=np.full(config.INPUT_SHAPE, i / 4, dtype=np.float32),
            deadline_ms=50,
            now_ms=NOW,
        )
        for i in range(3)
    ]
    return requester, responder, reqs


def test_batches_roundtrip_under_one_signature_each_way() -> None:
    """A batch of requests and its reply batch decode to what was built; each signature
    covers every item in order, and the items carry none of their own."""
    requester, responder, reqs = _batch_pair()
    batch = build_batch(requester, reqs)
    back = decode_batch(encode_batch(batch))
    assert back == batch
    assert [i.request_id for i in back.items] == [r.request_id for r in reqs]
    assert all(i.signature == b"" for i in back.items)
    assert verify_signature(requester.public_key, back.signature, back.signed_bytes())
    swapped = dataclasses.replace(back, items=back.items[::-1])
    assert not verify_signature(requester.public_key, swapped.signature, swapped.signed_bytes())
    replies = [
        build_reply(
            responder,
            r,
            variant="v",
            model_sha256=MODEL_SHA,
            probs=np.full(10, 0.1),
            infer_us=1,
            sign=False,
        )
        for r in reqs[:2]
    ]
    items = [replies[0], ItemError(reqs[1].request_id, "stale", "old"), replies[1]]
    signed = sign_replies(responder, items)
    out = decode_reply_batch(encode_reply_batch(signed))
    assert out == signed
    # The server's path: the replies encoded once, for the signature and the body alike.
    once, texts = signed_reply_batch(responder, items)
    assert once == signed
    assert encode_reply_batch(once, texts=texts) == encode_reply_batch(signed)
    with pytest.raises(ValueError, match="more texts"):
        encode_reply_batch(once, texts=[*texts, texts[0]])
    assert isinstance(out.items[1], ItemError)
    assert verify_signature(responder.public_key, out.signature, out.signed_bytes())
    # An error entry is not evidence and is not signed; a reply changed is caught.
    relabelled = dataclasses.replace(
        out, items=(dataclasses.replace(replies[0], topk=((7, 900_000),)), *out.items[1:])
    )
    assert not verify_signature(
        responder.public_key, relabelled.signature, relabelled.signed_bytes()
    )
    # A batch signature never verifies as a single message's, nor the other way round.
    assert not verify_signature(requester.public_key, reqs[0].signature, back.signed_bytes())


def test_batch_of_pre_encoded_bodies_decodes_to_the_same_batch() -> None:
    """Items spliced in as their own signed bodies decode as the items built; their own
    signatures are dropped (the batch's covers them), and an unsigned batch has zeros."""
    requester, _, reqs = _batch_pair()
    batch = build_batch(requester, reqs)
    spliced = encode_batch(batch, bodies=[encode_request(r) for r in reqs])
    assert decode_batch(spliced) == batch
    unsigned = build_batch(requester, reqs, sign=False)
    assert unsigned.signature == bytes(64)
    assert decode_batch(encode_batch(unsigned)).items == batch.items
    with pytest.raises(ValueError, match="bodies"):
        encode_batch(batch, bodies=[encode_request(reqs[0])])


def test_build_batch_refuses_other_requesters_and_bad_sizes() -> None:
    requester, responder, reqs = _batch_pair()
    with pytest.raises(ValueError, match="signer"):
        build_batch(responder, reqs)
    with pytest.raises(ValueError, match="1 to"):
        build_batch(requester, [])
    with pytest.raises(ValueError, match="1 to"):
        build_batch(requester, reqs * (config.MAX_BATCH_ITEMS // 3 + 1))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda o: o.update(items=[]), "items"),
        (lambda o: o.update(items={}), "items"),
        (lambda o: o.update(items=[1]), "must be a JSON object"),
        (lambda o: o["items"][0].pop("k"), "lacks field"),
        (lambda o: o["items"][0].update(signature="x"), "signature"),  # allowed, if well formed
        (lambda o: o["items"][0].update(extra=1), "unexpected field"),
        (lambda o: o.update(version="1"), "version"),
        (lambda o: o.pop("signature"), "lacks field"),
    ],
)
def test_decode_batch_names_what_is_wrong(mutate: Any, match: str) -> None:
    requester, _, reqs = _batch_pair()
    obj = _body(encode_batch(build_batch(requester, reqs)))
    mutate(obj)
    with pytest.raises(DecodeError, match=match):
        decode_batch(json.dumps(obj).encode())


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({"request_id": "x", "error": "stale", "message": ""}, "request_id"),
        ({"request_id": "a" * 32, "error": "Bad Code", "message": ""}, "error code"),
        ({"request_id": "a" * 32, "error": "stale", "message": "m" * 301}, "at most 300"),
        ({"request_id": "a" * 32, "error": "stale"}, "lacks field"),
    ],
)
def test_decode_reply_batch_checks_item_errors(item: dict[str, Any], match: str) -> None:
    _, responder, reqs = _batch_pair()
    signed = sign_replies(responder, [ItemError(reqs[0].request_id, "stale", "old")])
    obj = _body(encode_reply_batch(signed))
    obj["items"] = [item]
    with pytest.raises(DecodeError, match=match):
        decode_reply_batch(json.dumps(obj).encode())


@FUZZ
@given(st.binary(max_size=512))
def test_decode_batch_random_bytes_raises_only_decode_error(raw: bytes) -> None:
    for decode in (decode_batch, decode_reply_batch):
        with contextlib.suppress(DecodeError):
            decode(raw)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1.5, -0.1])
def test_tensor_bytes_refuses_non_finite_and_out_of_range_pixels(bad: float) -> None:
    tensor = np.full(config.INPUT_SHAPE, 0.5, dtype=np.float32)
    tensor[0, 3, 3] = bad
    with pytest.raises(ValueError, match=r"finite values in \[0, 1\]"):
        tensor_bytes(tensor)
