"""A family is a folder: ``manifest.json`` (schema 2) and the ONNX files it lists.

The manifest says what the runtime needs to serve the family and nothing model-specific:
the input (channels, height, width; uint8 pixels in CHW layout; the graph takes float32
N x C x H x W of pixel / 255 and resizes and normalises inside), the class names, each
model's file, sha256, size, cost, accuracies and recipe, and the family's name and id
(``swarm.inference.manifest.family_id`` over every model's sha256). See MANIFEST.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from swarm.inference.manifest import family_id, file_sha256

SCHEMA = 2


def input_object(
    channels: int, size: int, mean: list[float] | tuple[float, ...], std: Any
) -> dict[str, Any]:
    """The manifest's ``input``: the graph's tensor and the pixels it is made from."""
    return {
        "name": "input",
        "shape": [None, channels, size, size],
        "dtype": "float32",
        "scale": "pixel/255",
        "channels": channels,
        "height": size,
        "width": size,
        "pixels": {"dtype": "uint8", "layout": "CHW", "range": [0, 255]},
        "color": "grayscale" if channels == 1 else "RGB",
        "in_graph": {
            "normalize": {"mean": list(mean), "std": list(std), "of": "pixel/255"},
            "resize": "antialiased bilinear to each model's resolution, as two matrix products",
        },
    }


def output_object(num_classes: int) -> dict[str, Any]:
    return {
        "name": "probs",
        "shape": [None, num_classes],
        "dtype": "float32",
        "meaning": "softmax probabilities",
    }


def family_object(name: str, models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "id": family_id(m["sha256"] for m in models)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` as the folder's manifest.json (after checking its hashes)."""
    for m in manifest["models"]:
        got = file_sha256(folder / m["file"])
        if got != m["sha256"]:
            raise ValueError(f"{m['file']}: sha256 {got} is not the manifest's {m['sha256']}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def upgrade_schema1(path: Path, name: str, mean: float, std: float) -> dict[str, Any]:
    """A schema-1 manifest (Fashion-MNIST's first) rewritten as schema 2; same models."""
    old = json.loads(path.read_text())
    if old.get("schema") != 1:
        raise ValueError(f"{path} is schema {old.get('schema')!r}, not 1")
    _, channels, size, _ = old["input"]["shape"]
    return {
        "schema": SCHEMA,
        "family": family_object(name, old["models"]),
        "dataset": {
            "kind": "fashion-mnist",
            "description": old.get("dataset", ""),
            "split_seed": 20_230_601,
        },
        "input": input_object(channels, size, [mean], [std]),
        "output": output_object(len(old["class_names"])),
        "class_names": old["class_names"],
        **{
            k: v
            for k, v in old.items()
            if k not in {"schema", "dataset", "input", "output", "class_names"}
        },
    }
