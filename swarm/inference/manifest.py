"""The model manifest: which models exist, their files, hashes and measured costs.

``load_manifest`` reads ``variants/manifest.json`` (see ``variants/MANIFEST.md``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from swarm import config
from swarm.errors import ConfigError

MANIFEST_NAME: Final = "manifest.json"
MANIFEST_SCHEMA: Final = 1
ROLES: Final = ("variant", "reference")
FAMILY_TAG: Final = b"vswarm/family/v1\n"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """One shipped model as the manifest describes it; ``file`` is absolute."""

    name: str
    role: str
    file: Path
    sha256: str
    params: int
    macs: int
    resolution: int
    width: float
    val_accuracy: float
    test_accuracy: float
    latency_ms: float


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """The models that exist and the class names they share."""

    path: Path
    class_names: tuple[str, ...]
    models: tuple[ModelSpec, ...]

    def get(self, name: str) -> ModelSpec:
        """The model called ``name``; ConfigError listing the known names otherwise."""
        for spec in self.models:
            if spec.name == name:
                return spec
        known = ", ".join(m.name for m in self.models)
        raise ConfigError(f"no model named {name!r} in {self.path}; known models: {known}")

    @property
    def family_id(self) -> str:
        """32 hex characters naming the family by its models' hashes: peers and requesters
        of different families never mix their votes."""
        return family_id(m.sha256 for m in self.models)

    @property
    def variants(self) -> tuple[ModelSpec, ...]:
        """The models a peer may serve (role ``variant``)."""
        return tuple(m for m in self.models if m.role == "variant")


def family_id(model_sha256s: Iterable[str]) -> str:
    """The id of a family of models with these sha256 digests (hex), in any order."""
    digest = hashlib.sha256(FAMILY_TAG + "\n".join(sorted(model_sha256s)).encode("ascii"))
    return digest.hexdigest()[:32]


def default_manifest_path() -> Path:
    """``manifest.json`` inside the installed ``variants`` package (or the source tree)."""
    try:
        root = importlib.resources.files("variants")
    except ModuleNotFoundError:
        root = None
    if isinstance(root, Path):
        return root / MANIFEST_NAME
    return Path(__file__).resolve().parent.parent / "variants" / MANIFEST_NAME


def load_manifest(path: Path | None = None) -> Manifest:
    """Read and check a manifest; ConfigError says what is wrong and what to do."""
    path = (path if path is not None else default_manifest_path()).resolve()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"model manifest not found at {path}: train and export the variants "
            "(see variants/MANIFEST.md) or pass the path of a manifest.json"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read model manifest {path}: {exc}") from exc
    try:
        return _parse_manifest(path, raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"malformed model manifest {path}: {exc}; see variants/MANIFEST.md for the format"
        ) from exc


def _parse_manifest(path: Path, raw: Any) -> Manifest:
    if not isinstance(raw, dict):
        raise TypeError("top level must be a JSON object")
    if raw.get("schema") != MANIFEST_SCHEMA:
        raise ValueError(f"schema is {raw.get('schema')!r}, this runtime reads {MANIFEST_SCHEMA}")
    want_in = [None, *config.INPUT_SHAPE]
    if raw["input"].get("name") != config.INPUT_NAME or raw["input"].get("shape") != want_in:
        raise ValueError(f"input must be named {config.INPUT_NAME!r} with shape {want_in}")
    if raw["output"].get("shape") != [None, config.NUM_CLASSES]:
        raise ValueError(f"output shape must be [null, {config.NUM_CLASSES}]")
    names = raw["class_names"]
    if not (
        isinstance(names, list)
        and len(names) == config.NUM_CLASSES
        and all(isinstance(n, str) for n in names)
    ):
        raise ValueError(f"class_names must be a list of {config.NUM_CLASSES} strings")
    entries = raw["models"]
    if not isinstance(entries, list) or not entries:
        raise ValueError("models must be a non-empty list")
    models = tuple(_parse_model(path.parent, entry) for entry in entries)
    seen = [m.name for m in models]
    if len(set(seen)) != len(seen):
        raise ValueError(f"model names must be unique, got {seen}")
    return Manifest(path=path, class_names=tuple(names), models=models)


def _parse_model(folder: Path, entry: Any) -> ModelSpec:
    if not isinstance(entry, dict):
        raise TypeError(f"each model must be an object, got {entry!r}")
    name = _str(entry, "name")
    role = _str(entry, "role")
    if role not in ROLES:
        raise ValueError(f"model {name!r}: role must be one of {ROLES}, got {role!r}")
    sha = _str(entry, "sha256").lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"model {name!r}: sha256 must be 64 hex digits")
    return ModelSpec(
        name=name,
        role=role,
        file=(folder / _str(entry, "file")).resolve(),
        sha256=sha,
        params=_int(entry, "params"),
        macs=_int(entry, "macs"),
        resolution=_int(entry, "resolution"),
        width=_float(entry, "width"),
        val_accuracy=_float(entry, "val_accuracy"),
        test_accuracy=_float(entry, "test_accuracy"),
        latency_ms=_float(entry, "latency_ms"),
    )


def _str(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise TypeError(f"model {entry.get('name')!r}: {key!r} must be a non-empty string")
    return value


def _int(entry: dict[str, Any], key: str) -> int:
    value = entry.get(key)
    # bool is an int in Python, but never a count here.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"model {entry.get('name')!r}: {key!r} must be an integer >= 0")
    return value


def _float(entry: dict[str, Any], key: str) -> float:
    value = entry.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise TypeError(f"model {entry.get('name')!r}: {key!r} must be a finite number")
    return float(value)
