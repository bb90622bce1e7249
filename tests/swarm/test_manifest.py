"""Tests of swarm.inference.manifest: loading and checking the model manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from swarm.errors import ConfigError
from swarm.inference.manifest import (
    InputSpec,
    Manifest,
    default_manifest_path,
    family_id,
    load_manifest,
)
from tests.swarm.conftest import model_entry, write_manifest

# --- manifest ---------------------------------------------------------------------------


def test_manifest_loads_specs_with_absolute_paths(tiny_model_dir: Path) -> None:
    """A valid manifest yields every model, its fields, and an absolute file path."""
    manifest = load_manifest(tiny_model_dir / "manifest.json")
    assert [m.name for m in manifest.models] == ["T1", "T2", "T3"]
    spec = manifest.get("T2")
    assert spec.file == (tiny_model_dir / "models" / "t2.onnx").resolve()
    assert spec.file.is_absolute()
    assert spec.role == "variant"
    assert spec.macs == 7840
    assert spec.val_accuracy == pytest.approx(0.82)
    assert len(manifest.class_names) == 10
    assert manifest.variants == manifest.models


def test_manifest_get_unknown_lists_known_names(tiny_manifest: Manifest) -> None:
    """Asking for an unknown model names the models that exist."""
    with pytest.raises(ConfigError, match=r"'V9'.*T1, T2, T3"):
        tiny_manifest.get("V9")


def test_missing_manifest_says_what_to_do(tmp_path: Path) -> None:
    """A missing manifest is a ConfigError naming the path and how to produce one."""
    with pytest.raises(ConfigError, match=r"not found.*MANIFEST\.md"):
        load_manifest(tmp_path / "nope.json")


def test_default_manifest_path_is_the_shipped_family() -> None:
    """Without a path, the manifest is the shipped Fashion-MNIST family's, in the variants
    package, and it is a schema-2 family of ten classes on 1 x 28 x 28 input."""
    path = default_manifest_path()
    assert path.name == "manifest.json"
    assert path.parent.name == "fashion-mnist"
    assert path.parent.parent.name == "families"
    assert path.parent.parent.parent.name == "variants"
    manifest = load_manifest()
    assert manifest.input.shape == (1, 28, 28)
    assert manifest.num_classes == 10
    assert manifest.family_name == "fashion-mnist"


def test_unparseable_manifest_is_config_error(tmp_path: Path) -> None:
    """A manifest that is not JSON is a ConfigError, not a JSONDecodeError."""
    (tmp_path / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read"):
        load_manifest(tmp_path / "manifest.json")


def _entry(**overrides: Any) -> dict[str, Any]:
    return model_entry("V1", "models/v1.onnx", b"x", **overrides)


@pytest.mark.parametrize(
    ("models", "top", "match"),
    [
        ([_entry()], {"schema": 3}, "schema"),
        ([_entry()], {"class_names": ["a", "b"]}, "class_names"),
        ([_entry()], {"input": {"name": "x", "shape": [None, 1, 28, 28]}}, "input"),
        ([_entry()], {"output": {"shape": [None, 5]}}, "output"),
        ([_entry()], {"input": 5}, "malformed"),
        ([], {}, "non-empty"),
        ([_entry(), _entry()], {}, "unique"),
        ([_entry(role="boss")], {}, "role"),
        ([_entry(sha256="abc")], {}, "sha256"),
        ([_entry(macs=True)], {}, "macs"),
        ([_entry(params=-1)], {}, "params"),
        ([_entry(val_accuracy="high")], {}, "val_accuracy"),
        ([_entry(latency_ms=None)], {}, "latency_ms"),
        ([{k: v for k, v in _entry().items() if k != "file"}], {}, "file"),
        (["V1"], {}, "object"),
    ],
)
def test_malformed_manifest_is_config_error(
    tmp_path: Path, models: list[Any], top: dict[str, Any], match: str
) -> None:
    """Each kind of malformed manifest is a ConfigError that points at the problem."""
    path = write_manifest(tmp_path, models, **top)
    with pytest.raises(ConfigError, match=match):
        load_manifest(path)


def test_manifest_top_level_must_be_object(tmp_path: Path) -> None:
    """A JSON array at the top level is rejected with a ConfigError."""
    (tmp_path / "manifest.json").write_text(json.dumps([1]), encoding="utf-8")
    with pytest.raises(ConfigError, match="object"):
        load_manifest(tmp_path / "manifest.json")


# --- schema 2: a family folder ------------------------------------------------------------


def _family(folder: Path, channels: int = 3, side: int = 32, classes: int = 5) -> dict[str, Any]:
    """A schema-2 family of two model files (their bytes need not be ONNX here)."""
    (folder / "models").mkdir(parents=True, exist_ok=True)
    models = []
    for name, data in (("reference", b"ref"), ("V1", b"v1")):
        file = f"models/{name.lower()}.onnx"
        (folder / file).write_bytes(data)
        role = "reference" if name == "reference" else "variant"
        models.append(model_entry(name, file, data, role=role))
    return {
        "schema": 2,
        "family": {"name": "pets", "id": family_id(m["sha256"] for m in models)},
        "input": {
            "name": "input",
            "shape": [None, channels, side, side],
            "dtype": "float32",
            "scale": "pixel/255",
            "channels": channels,
            "height": side,
            "width": side,
            "pixels": {"dtype": "uint8", "layout": "CHW"},
        },
        "output": {"name": "probs", "shape": [None, classes]},
        "class_names": [f"c{i}" for i in range(classes)],
        "models": models,
    }


def _write(folder: Path, raw: dict[str, Any]) -> Path:
    (folder / "manifest.json").write_text(json.dumps(raw), encoding="utf-8")
    return folder


def test_schema2_family_exposes_its_input_classes_and_id(tmp_path: Path) -> None:
    """A family folder loads (by folder or file) with its real input, classes and id."""
    raw = _family(tmp_path)
    manifest = load_manifest(_write(tmp_path, raw), verify=True)
    assert manifest.input == InputSpec(channels=3, height=32, width=32)
    assert manifest.input.shape == (3, 32, 32)
    assert manifest.num_classes == 5
    assert manifest.family_name == "pets"
    assert manifest.family_id == raw["family"]["id"]
    assert load_manifest(tmp_path / "manifest.json").family_id == manifest.family_id


def test_family_id_must_match_the_models_hashes(tmp_path: Path) -> None:
    """A stored family id that the models' hashes do not give is refused, with the fix."""
    raw = _family(tmp_path)
    raw["family"]["id"] = "0" * 32
    with pytest.raises(ConfigError, match=r"family id.*does not match.*re-export"):
        load_manifest(_write(tmp_path, raw))


def test_verify_names_a_file_whose_hash_differs(tmp_path: Path) -> None:
    """verify=True checks every file's sha256 and names the one that differs; without it
    the files are not read."""
    _write(tmp_path, _family(tmp_path))
    (tmp_path / "models" / "v1.onnx").write_bytes(b"tampered")
    assert load_manifest(tmp_path).family_name == "pets"
    with pytest.raises(ConfigError, match=r"v1\.onnx of V1 has sha256.*restore"):
        load_manifest(tmp_path, verify=True)
    (tmp_path / "models" / "v1.onnx").unlink()
    with pytest.raises(ConfigError, match=r"v1\.onnx of V1.*cannot be read"):
        load_manifest(tmp_path, verify=True)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: r["input"].update(channels=2), "channels"),
        (lambda r: r["input"].update(shape=[None, 3, 28, 28]), "shape"),
        (lambda r: r["input"].update(pixels={"dtype": "float32", "layout": "CHW"}), "uint8"),
        (lambda r: r["input"].update(height=0), "height"),
        (lambda r: r.update(class_names=["only"], output={"shape": [None, 1]}), "2..1000"),
        (lambda r: r.update(class_names=["a"] * 5), "distinct"),
        (lambda r: r["output"].update(shape=[None, 4]), "output shape"),
        (lambda r: r.pop("family"), "family"),
        (lambda r: r["family"].update(id="abc"), "32 hex"),
    ],
)
def test_malformed_schema2_is_config_error(tmp_path: Path, change: Any, match: str) -> None:
    """Each kind of malformed schema-2 manifest is a ConfigError naming the problem."""
    raw = _family(tmp_path)
    change(raw)
    with pytest.raises(ConfigError, match=match):
        load_manifest(_write(tmp_path, raw))


def test_a_thousand_classes_are_a_family(tmp_path: Path) -> None:
    """Any class count from 2 to 1,000 is read as is."""
    raw = _family(tmp_path, channels=1, side=64, classes=1000)
    assert load_manifest(_write(tmp_path, raw)).num_classes == 1000
