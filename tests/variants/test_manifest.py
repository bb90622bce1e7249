"""The shipped families' manifests match their ONNX files and the family's rules."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from swarm.inference.manifest import file_sha256, load_manifest
from variants import CLASS_NAMES, DEFAULT_FAMILY_DIR, FAMILIES_DIR, MANIFEST_PATH

MANIFEST = json.loads(MANIFEST_PATH.read_text())
MODELS = MANIFEST["models"]


def test_manifest_lists_a_reference_and_at_least_five_variants() -> None:
    """The family is one reference and at least five variants with distinct names."""
    roles = [m["role"] for m in MODELS]
    assert roles.count("reference") == 1
    assert roles.count("variant") >= 5
    assert len({m["name"] for m in MODELS}) == len(MODELS)
    assert MANIFEST["class_names"] == list(CLASS_NAMES)


@pytest.mark.parametrize("entry", MODELS, ids=[m["name"] for m in MODELS])
def test_file_hash_and_interface_match(entry: dict[str, object]) -> None:
    """Each file exists, has the recorded sha256 and the one shared interface."""
    path = DEFAULT_FAMILY_DIR / str(entry["file"])
    assert file_sha256(path) == entry["sha256"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert inp.name == "input" and inp.type == "tensor(float)"
    assert inp.shape[1:] == [1, 28, 28] and not isinstance(inp.shape[0], int)
    assert out.name == "probs" and out.shape[1:] == [10]
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    probs = sess.run(None, {"input": x})[0]
    assert probs.shape == (3, 10)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_variants_are_much_cheaper_than_the_reference() -> None:
    """Every variant has >= 5x fewer MACs than the reference, the cheapest >= 20x."""
    ref = next(m for m in MODELS if m["role"] == "reference")
    gains = [ref["macs"] / m["macs"] for m in MODELS if m["role"] == "variant"]
    assert min(gains) >= 5.0
    assert max(gains) >= 20.0


def test_recorded_accuracies_meet_the_family_targets() -> None:
    """The manifest records reference >= 93% and each variant >= 88% on the test set."""
    for m in MODELS:
        floor = 0.93 if m["role"] == "reference" else 0.88
        assert m["test_accuracy"] >= floor, m["name"]
        assert 0.0 < m["val_accuracy"] <= 1.0
        assert m["recipe"]["seed"] is not None and m["recipe"]["command"]


@pytest.mark.parametrize("folder", sorted(FAMILIES_DIR.iterdir()), ids=lambda p: p.name)
def test_every_shipped_family_loads_and_verifies(folder: object) -> None:
    """Each folder under families/ is a schema-2 family whose files match their hashes."""
    manifest = load_manifest(folder, verify=True)  # type: ignore[arg-type]
    raw = json.loads((folder / "manifest.json").read_text())  # type: ignore[operator]
    assert raw["schema"] == 2 and raw["family"]["id"] == manifest.family_id
    assert manifest.num_classes == len(raw["class_names"])
    assert sum(m.role == "reference" for m in manifest.models) == 1
    for spec in manifest.models:
        sess = ort.InferenceSession(str(spec.file), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].shape[1:] == list(manifest.input.shape)
        assert sess.get_outputs()[0].shape[1:] == [manifest.num_classes]
