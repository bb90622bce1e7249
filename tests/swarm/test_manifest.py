"""Tests of swarm.inference.manifest: loading and checking the model manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from swarm.errors import ConfigError
from swarm.inference.manifest import Manifest, default_manifest_path, load_manifest
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


def test_default_manifest_path_is_in_variants() -> None:
    """Without a path, the manifest is looked up in the variants package."""
    path = default_manifest_path()
    assert path.name == "manifest.json"
    assert path.parent.name == "variants"


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
        ([_entry()], {"schema": 2}, "schema"),
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
