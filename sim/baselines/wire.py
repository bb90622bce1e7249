"""The baselines' messages: a JSON head and one raw tensor, signed with Ed25519.

A body is ``len(head) (4 bytes, big-endian) | head (JSON) | tensor bytes``. The head names
the tensor's dtype and shape; ``decode`` checks every bound before it trusts one. What
is signed is domain-separated (``vswarm/baseline/...``) and binds the request id, the
deadline and the sha256 of the tensor, as the swarm's own replies do:

- the requester signs a request (its fields and the input's hash);
- a stage signs the activation it hands on (request id, its hop, the tensor's hash);
- the answering peer signs its reply (request id, its fields, the output's hash).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from swarm.crypto.identity import Identity, verify_signature

MAX_HEAD: Final = 16 * 1024
MAX_TENSOR: Final = 4 * 1024 * 1024  # the largest activation (100 KB per image) x a margin
MAX_DIMS: Final = 5
DTYPES: Final = {"uint8": np.uint8, "float32": np.float32}
TAG: Final = b"vswarm/baseline/v1/"


class BaselineWireError(ValueError):
    """A body or signature that is not what it must be; the message says what is wrong."""


def unix_ms() -> int:
    return int(time.time() * 1000)


def encode(head: dict[str, Any], tensor: npt.NDArray[Any]) -> bytes:
    """One body: the head (with the tensor's dtype and shape added) and the tensor."""
    arr = np.ascontiguousarray(tensor)
    if arr.dtype.name not in DTYPES:
        raise BaselineWireError(f"dtype {arr.dtype} is not one of {sorted(DTYPES)}")
    raw = json.dumps(
        {**head, "dtype": arr.dtype.name, "shape": list(arr.shape)}, separators=(",", ":")
    ).encode()
    return struct.pack(">I", len(raw)) + raw + arr.tobytes()


def decode(body: bytes) -> tuple[dict[str, Any], npt.NDArray[Any]]:
    """The head and tensor of ``body``; ``BaselineWireError`` for anything malformed."""
    if len(body) < 4:
        raise BaselineWireError("body shorter than its 4-byte head length")
    (size,) = struct.unpack(">I", body[:4])
    if size > MAX_HEAD or 4 + size > len(body):
        raise BaselineWireError(f"head length {size} exceeds {MAX_HEAD} or the body")
    try:
        head = json.loads(body[4 : 4 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineWireError(f"head is not JSON: {exc}") from None
    if not isinstance(head, dict):
        raise BaselineWireError("head is not a JSON object")
    dtype, shape = head.get("dtype"), head.get("shape")
    if dtype not in DTYPES:
        raise BaselineWireError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_DIMS
        or not all(isinstance(d, int) and 0 < d <= MAX_TENSOR for d in shape)
    ):
        raise BaselineWireError(f"shape {shape!r} is not 1..{MAX_DIMS} positive ints")
    want = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
    data = body[4 + size :]
    if want > MAX_TENSOR or len(data) != want:
        raise BaselineWireError(f"tensor of {len(data)} bytes; shape {shape} needs {want}")
    return head, np.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)


MAX_CHAIN: Final = 32


def check_head(head: dict[str, Any]) -> None:
    """Raise ``BaselineWireError`` unless the request head's fields have their types."""
    chain = head.get("chain")
    if not isinstance(head.get("id"), str) or not 0 < len(head["id"]) <= 64:
        raise BaselineWireError("id must be a string of 1..64 characters")
    if type(head.get("deadline_ms")) is not int or type(head.get("hop", 0)) is not int:
        raise BaselineWireError("deadline_ms and hop must be integers")
    if not isinstance(head.get("requester"), str):
        raise BaselineWireError("requester must be a base64 public key")
    if (
        not isinstance(chain, list)
        or len(chain) > MAX_CHAIN
        or not all(
            isinstance(c, dict) and isinstance(c.get("url"), str) and isinstance(c.get("key"), str)
            for c in chain
        )
    ):
        raise BaselineWireError(f"chain must be a list of at most {MAX_CHAIN} {{url, key}}")


def digest(tensor: npt.NDArray[Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(tensor).tobytes()).hexdigest()


def _signed_bytes(kind: str, fields: dict[str, Any]) -> bytes:
    return TAG + kind.encode() + b"\n" + json.dumps(fields, sort_keys=True).encode()


def sign(identity: Identity, kind: str, fields: dict[str, Any]) -> str:
    return base64.b64encode(identity.sign(_signed_bytes(kind, fields))).decode()


def check(key_b64: str, signature_b64: Any, kind: str, fields: dict[str, Any]) -> None:
    """Raise ``BaselineWireError`` unless the signature is ``key``'s over ``fields``."""
    try:
        key = base64.b64decode(key_b64, validate=True)
        sig = base64.b64decode(str(signature_b64), validate=True)
    except ValueError:
        raise BaselineWireError(f"{kind}: key or signature is not base64") from None
    if not verify_signature(key, sig, _signed_bytes(kind, fields)):
        raise BaselineWireError(f"{kind}: bad signature")


def request_fields(head: dict[str, Any], input_digest: str) -> dict[str, Any]:
    """What the requester's signature covers: everything that steers the call."""
    return {
        "id": head.get("id"),
        "deadline_ms": head.get("deadline_ms"),
        "requester": head.get("requester"),
        "chain": head.get("chain"),
        "input": input_digest,
    }
