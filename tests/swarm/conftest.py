"""Shared fixtures for the runtime's tests: tiny ONNX models, a manifest, a thread guard.

The tiny models have exactly the shipped interface (input ``input`` float32
[N, 1, 28, 28], output ``probs`` float32 [N, 10] softmax) and fixed random weights, so
tests never need the trained variants.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from swarm import config
from swarm.crypto.identity import Identity
from swarm.inference.manifest import Manifest, load_manifest
from swarm.wire.codec import build_reply
from swarm.wire.messages import InferReply, InferRequest, build_request
from tests.swarm.signed import FAMILY, MODEL_SHA, NOW
from variants import CLASS_NAMES as VARIANT_CLASS_NAMES

CLASS_NAMES = list(VARIANT_CLASS_NAMES)
# name -> weight seed of the variants in the tiny manifest.
TINY_VARIANTS = {"T1": 1, "T2": 2, "T3": 3}


def build_tiny_model(
    *,
    seed: int = 0,
    input_name: str = "input",
    input_shape: tuple[int | str, ...] = ("N", 1, 28, 28),
    elem_type: int = TensorProto.FLOAT,
    classes: int = 10,
) -> bytes:
    """Serialized ONNX: Flatten -> MatMul (fixed random weights) -> Add -> Softmax."""
    rng = np.random.default_rng(seed)
    np_type = np.float32 if elem_type == TensorProto.FLOAT else np.float64
    features = int(np.prod([d for d in input_shape[1:] if isinstance(d, int)]))
    weights = rng.normal(0.0, 0.1, size=(features, classes)).astype(np_type)
    bias = rng.normal(0.0, 0.1, size=(classes,)).astype(np_type)
    batch = input_shape[0]
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [input_name], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info(input_name, elem_type, list(input_shape))],
        [helper.make_tensor_value_info("probs", elem_type, [batch, classes])],
        initializer=[
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(bias, "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def model_entry(name: str, file: str, data: bytes, **overrides: Any) -> dict[str, Any]:
    """A manifest entry for a model file written with ``data``."""
    entry: dict[str, Any] = {
        "name": name,
        "role": "variant",
        "file": file,
        "sha256": hashlib.sha256(data).hexdigest(),
        "params": 7850,
        "macs": 7840,
        "resolution": 28,
        "width": 0.25,
        "val_accuracy": 0.8,
        "test_accuracy": 0.79,
        "latency_ms": 0.01,
    }
    entry.update(overrides)
    return entry


def write_manifest(folder: Path, models: list[dict[str, Any]], **overrides: Any) -> Path:
    """Write a schema-1 manifest.json listing ``models`` into ``folder``."""
    raw: dict[str, Any] = {
        "schema": 1,
        "input": {"name": "input", "shape": [None, 1, 28, 28], "dtype": "float32"},
        "output": {"name": "probs", "shape": [None, 10], "dtype": "float32"},
        "class_names": CLASS_NAMES,
        "models": models,
    }
    raw.update(overrides)
    path = folder / "manifest.json"
    path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A folder with manifest.json and models/t1..t3.onnx: three tiny variants T1-T3."""
    (tmp_path / "models").mkdir()
    entries = []
    for name, seed in TINY_VARIANTS.items():
        data = build_tiny_model(seed=seed)
        file = f"models/{name.lower()}.onnx"
        (tmp_path / file).write_bytes(data)
        entries.append(model_entry(name, file, data, val_accuracy=0.8 + seed / 100))
    write_manifest(tmp_path, entries)
    return tmp_path


@pytest.fixture
def tiny_manifest(tiny_model_dir: Path) -> Manifest:
    """The loaded manifest of ``tiny_model_dir``."""
    return load_manifest(tiny_model_dir / "manifest.json")


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads running after its fixtures closed."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and not t.daemon]
    for thread in leaked:
        thread.join(timeout=2.0)  # one that is already finishing gets to finish
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test left non-daemon threads running: {still}"


# --- messages: one requester, one responder, a request and its reply --------------------


@pytest.fixture
def requester() -> Identity:
    """The requesting peer."""
    return Identity.from_seed(b"\x01" * 32)


@pytest.fixture
def responder() -> Identity:
    """The answering peer."""
    return Identity.from_seed(b"\x02" * 32)


@pytest.fixture
def tensor() -> np.ndarray:
    """A valid input tensor with distinct pixel values."""
    return np.linspace(0.0, 1.0, 784, dtype=np.float32).reshape(config.INPUT_SHAPE)


@pytest.fixture
def request_msg(requester: Identity, tensor: np.ndarray) -> InferRequest:
    """A request of ``requester`` for ``tensor``."""
    return build_request(
        swarm="lab",
        family=FAMILY,
        requester_id=requester.peer_id,
        tensor=tensor,
        k=2,
        deadline_ms=2000,
    )


@pytest.fixture
def reply_msg(responder: Identity, request_msg: InferRequest) -> InferReply:
    """A reply of ``responder`` to ``request_msg`` issued at NOW (unsigned: its batch is)."""
    probs = np.array([0.05, 0.6, 0.05, 0.25, 0.05, 0, 0, 0, 0, 0], dtype=np.float32)
    return build_reply(
        request_msg,
        responder_id=responder.peer_id,
        variant="mnv2-w035-r28",
        model_sha256=MODEL_SHA,
        probs=probs,
        infer_us=1234,
        now_ms=NOW,
    )
