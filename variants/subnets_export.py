"""Export the class-parallel sub-models (``variants.sensai``) and write their manifest.

Each sub-model becomes one ONNX file (input ``input``, N x 1 x 28 x 28, pixel / 255;
output ``probs``, N x (g + 1): its group's classes, then "other"). Weights are stored as
float16 and cast to float32 inside the graph, which ONNX Runtime folds at load: half the
bytes on disk, float32 arithmetic. Accuracies are measured on those files. The manifest
records, per grouping, the swarm's accuracy (class of the most confident group) and, per
sub-model, its accuracy, params, MACs and latency beside the reference measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from variants import CLASS_NAMES, data, runtime

if TYPE_CHECKING:
    from variants.sensai import Grouping

SCHEMA = 1
# Largest change of any probability that float16 storage may cause; the accuracies
# recorded are measured on the float16 files themselves.
FP16_TOL = 1e-2


def to_fp16_storage(path: Path) -> None:
    """Store every float32 initializer of the ONNX file as float16 plus a Cast node."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    casts = []
    kept = []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32 or arr.size < 16:
            kept.append(init)
            continue
        half = numpy_helper.from_array(arr.astype(np.float16), init.name + "_fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_member(model: Any, path: Path, x: np.ndarray) -> dict[str, float]:
    """ONNX file for ``model`` at ``path``; returns the float16 storage's deviation."""
    from variants.export import export_onnx

    export_onnx(model, path)
    before = runtime.predict(path, x)
    to_fp16_storage(path)
    diff = float(np.abs(runtime.predict(path, x) - before).max())
    if diff > FP16_TOL:
        raise RuntimeError(f"{path}: float16 weights change outputs by {diff:.2e}")
    return {"fp16_max_diff": diff}


def export_grouping(
    grouping: Grouping,
    models: list[Any],
    out: Path,
    val: data.Split,
    test: data.Split,
) -> dict[str, Any]:
    """Export one grouping's sub-models; score them and the grouping on val and test."""
    from swarm.inference.manifest import file_sha256
    from variants.models import count_macs, count_params
    from variants.sensai import combine, group_labels

    out.mkdir(parents=True, exist_ok=True)
    members = []
    outs: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    for i, (group, model) in enumerate(zip(grouping.groups, models, strict=True)):
        name = grouping.member(i)
        path = out / f"{name}.onnx"
        parity = export_member(model, path, test.as_float()[:64])
        probs = {
            s: runtime.predict(path, split.as_float())
            for s, split in (("val", val), ("test", test))
        }
        for s, got in outs.items():
            got.append(probs[s])
        members.append(
            {
                "name": name,
                "file": path.name,
                "sha256": file_sha256(path),
                "classes": list(group),
                "outputs": [CLASS_NAMES[c] for c in group] + ["other"],
                "params": count_params(model),
                "macs": count_macs(model),
                "keep": grouping.keep,
                "val_accuracy": round(
                    float((probs["val"].argmax(1) == group_labels(val.labels, group)).mean()), 5
                ),
                "test_accuracy": round(
                    float((probs["test"].argmax(1) == group_labels(test.labels, group)).mean()), 5
                ),
                "selected_epoch": int(getattr(model, "best_epoch", 0)),
                **parity,
            }
        )
    acc = {
        s: round(float((combine(outs[s], grouping.groups).argmax(1) == split.labels).mean()), 5)
        for s, split in (("val", val), ("test", test))
    }
    return {
        "name": grouping.name,
        "groups": [list(g) for g in grouping.groups],
        "keep": grouping.keep,
        "val_accuracy": acc["val"],
        "test_accuracy": acc["test"],
        "members": members,
    }


def write_manifest(
    out: Path, entries: list[dict[str, Any]], reference: Path, args: argparse.Namespace
) -> Path:
    """Merge ``entries`` into ``out/manifest.json``; time every sub-model beside the
    reference in one run (onnxruntime, 1 thread, batch 1)."""
    from variants.evaluate import measure_latencies

    path = out / "manifest.json"
    old = json.loads(path.read_text())["groupings"] if path.exists() else []
    names = {e["name"] for e in entries}
    groupings = [g for g in old if g["name"] not in names] + entries
    paths = {"reference": reference}
    for g in groupings:
        for m in g["members"]:
            paths[m["name"]] = out / m["file"]
    lat = measure_latencies(paths, args.latency_runs)
    ref_ms = lat["reference"]["median_ms"]
    for g in groupings:
        for m in g["members"]:
            m["latency_ms"] = round(lat[m["name"]]["median_ms"], 4)
            m["speedup"] = round(ref_ms / lat[m["name"]]["median_ms"], 2)
    manifest = {
        "schema": SCHEMA,
        "what": "sensAI-style class-parallel sub-models pruned from the reference",
        "dataset": "Fashion-MNIST; selection on the validation split, test = t10k",
        "reference": {"file": str(reference.name), "latency_ms": round(ref_ms, 4)},
        "recipe": {
            "command": "python -m variants.sensai",
            "epochs": args.epochs,
            "images_per_epoch": args.images_per_epoch,
            "batch": args.batch,
            "lr": args.lr,
            "device": args.device,
        },
        "groupings": sorted(groupings, key=lambda g: len(g["groups"])),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)
    return path
