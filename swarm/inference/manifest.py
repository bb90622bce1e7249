"""The model manifest: a family's input, classes, models, their files, hashes and costs.

``load_manifest`` reads a family folder's ``manifest.json`` (schema 2, see
``variants/MANIFEST.md``; schema 1, the first Fashion-MNIST layout, is still read). The
shipped family is ``variants/families/fashion-mnist``.
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
MANIFEST_SCHEMA: Final = 2
SCHEMAS: Final = (1, 2)
DEFAULT_FAMILY: Final = "fashion-mnist"
ROLES: Final = ("variant", "reference")
FAMILY_TAG: Final = b"vswarm/family/v1\n"
MIN_CLASSES: Final = 2
MAX_CLASSES: Final = 1000
CHANNELS: Final = (1, 3)
MAX_SIDE: Final = 1024  # pixels; a family's input is small by design (edge devices)
ID_HEX: Final = 32


@dataclasses.dataclass(frozen=True, slots=True)
class InputSpec:
    """The family's input: uint8 pixels, channels x height x width (CHW layout); the
    graphs take float32 N x C x H x W of pixel / 255."""

    channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return (self.channels, self.height, self.width)


FASHION_INPUT: Final = InputSpec(*config.INPUT_SHAPE)


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
    """A family: its models, the class names they share, and its input."""

    path: Path
    class_names: tuple[str, ...]
    models: tuple[ModelSpec, ...]
    input: InputSpec = FASHION_INPUT
    family_name: str = DEFAULT_FAMILY

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
    def num_classes(self) -> int:
        """How many classes the family's models tell apart."""
        return len(self.class_names)

    @property
    def variants(self) -> tuple[ModelSpec, ...]:
        """The models a peer may serve (role ``variant``)."""
        return tuple(m for m in self.models if m.role == "variant")


def family_id(model_sha256s: Iterable[str]) -> str:
    """The id of a family of models with these sha256 digests (hex), in any order."""
    digest = hashlib.sha256(FAMILY_TAG + "\n".join(sorted(model_sha256s)).encode("ascii"))
    return digest.hexdigest()[:32]


def default_manifest_path() -> Path:
    """The shipped family's ``manifest.json`` in the installed ``variants`` package (or the
    source tree): ``variants/families/fashion-mnist/manifest.json``."""
    try:
        root = importlib.resources.files("variants")
    except ModuleNotFoundError:
        root = None
    if not isinstance(root, Path):
        root = Path(__file__).resolve().parent.parent.parent / "variants"
    return root / "families" / DEFAULT_FAMILY / MANIFEST_NAME


def load_manifest(path: Path | None = None, *, verify: bool = False) -> Manifest:
    """Read and check a manifest (a file, or a family folder holding ``manifest.json``);
    ConfigError says what is wrong and what to do. ``verify``: also check every model
    file's sha256 against the manifest."""
    path = (path if path is not None else default_manifest_path()).resolve()
    if path.is_dir():
        path = path / MANIFEST_NAME
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
        manifest = _parse_manifest(path, raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"malformed model manifest {path}: {exc}; see variants/MANIFEST.md for the format"
        ) from exc
    if verify:
        verify_files(manifest)
    return manifest


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(manifest: Manifest) -> None:
    """Check that every model file exists and has the manifest's sha256."""
    for spec in manifest.models:
        try:
            got = file_sha256(spec.file)
        except OSError as exc:
            raise ConfigError(
                f"model file {spec.file} of {spec.name} in {manifest.path} cannot be read "
                f"({exc.strerror or exc}); restore the family folder or re-export it with "
                "python -m variants.train --phase export"
            ) from exc
        if got != spec.sha256:
            raise ConfigError(
                f"model file {spec.file} of {spec.name} has sha256 {got[:16]}..., not the "
                f"{spec.sha256[:16]}... that {manifest.path} records: the file was replaced "
                "or corrupted; restore the family folder or re-export it with "
                "python -m variants.train --phase export"
            )


def _parse_manifest(path: Path, raw: Any) -> Manifest:
    if not isinstance(raw, dict):
        raise TypeError("top level must be a JSON object")
    schema = raw.get("schema")
    if schema not in SCHEMAS:
        raise ValueError(
            f"schema is {schema!r}, this runtime reads {' or '.join(map(str, SCHEMAS))}"
        )
    if schema == 1:
        spec, names = _parse_v1_io(raw)
        family_name = DEFAULT_FAMILY
    else:
        spec = _parse_input(raw["input"])
        names = _parse_class_names(raw["class_names"])
        family_name = _parse_family_name(raw["family"])
    if raw["output"].get("shape") != [None, len(names)]:
        raise ValueError(f"output shape must be [null, {len(names)}] (one per class name)")
    entries = raw["models"]
    if not isinstance(entries, list) or not entries:
        raise ValueError("models must be a non-empty list")
    models = tuple(_parse_model(path.parent, entry) for entry in entries)
    seen = [m.name for m in models]
    if len(set(seen)) != len(seen):
        raise ValueError(f"model names must be unique, got {seen}")
    manifest = Manifest(
        path=path, class_names=names, models=models, input=spec, family_name=family_name
    )
    if schema == 2:
        stored = raw["family"].get("id")
        if stored != manifest.family_id:
            raise ValueError(
                f"family id {stored!r} does not match the models' hashes (which give "
                f"{manifest.family_id!r}): the manifest was edited by hand or its models "
                "were swapped; re-export the family with python -m variants.train --phase export"
            )
    return manifest


def _parse_v1_io(raw: dict[str, Any]) -> tuple[InputSpec, tuple[str, ...]]:
    """Schema 1 fixed the input at Fashion-MNIST's 1 x 28 x 28 and ten classes."""
    want_in = [None, *config.INPUT_SHAPE]
    if raw["input"].get("name") != config.INPUT_NAME or raw["input"].get("shape") != want_in:
        raise ValueError(f"input must be named {config.INPUT_NAME!r} with shape {want_in}")
    names = raw["class_names"]
    if not (
        isinstance(names, list)
        and len(names) == config.NUM_CLASSES
        and all(isinstance(n, str) for n in names)
    ):
        raise ValueError(f"class_names must be a list of {config.NUM_CLASSES} strings")
    return FASHION_INPUT, tuple(names)


def _parse_input(raw: Any) -> InputSpec:
    if not isinstance(raw, dict):
        raise TypeError("input must be an object")
    if raw.get("name") != config.INPUT_NAME or raw.get("dtype") != "float32":
        raise ValueError(f"input must be named {config.INPUT_NAME!r} with dtype float32")
    dims = []
    for key, allowed in (("channels", CHANNELS), ("height", None), ("width", None)):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"input {key!r} must be an integer")
        if allowed is not None and value not in allowed:
            raise ValueError(f"input channels must be 1 (grayscale) or 3 (RGB), got {value}")
        if allowed is None and not 1 <= value <= MAX_SIDE:
            raise ValueError(f"input {key} {value} outside 1..{MAX_SIDE}")
        dims.append(value)
    spec = InputSpec(*dims)
    if raw.get("shape") != [None, *spec.shape]:
        raise ValueError(f"input shape {raw.get('shape')!r} is not [null, {spec.shape}]")
    pixels = raw.get("pixels")
    if (
        not isinstance(pixels, dict)
        or pixels.get("dtype") != "uint8"
        or pixels.get("layout") != "CHW"
    ):
        raise ValueError('input pixels must be {"dtype": "uint8", "layout": "CHW"}')
    if raw.get("scale") != "pixel/255":
        raise ValueError('input scale must be "pixel/255"')
    return spec


def _parse_class_names(names: Any) -> tuple[str, ...]:
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise TypeError("class_names must be a list of non-empty strings")
    if not MIN_CLASSES <= len(names) <= MAX_CLASSES:
        raise ValueError(
            f"class_names holds {len(names)} names; a family has {MIN_CLASSES}..{MAX_CLASSES}"
        )
    if len(set(names)) != len(names):
        raise ValueError("class_names must be distinct")
    return tuple(names)


def _parse_family_name(raw: Any) -> str:
    if not isinstance(raw, dict):
        raise TypeError('family must be an object {"name": ..., "id": ...}')
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError("family name must be a non-empty string")
    fid = raw.get("id")
    if not isinstance(fid, str) or len(fid) != ID_HEX:
        raise TypeError(f"family id must be {ID_HEX} hex characters")
    return name


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
