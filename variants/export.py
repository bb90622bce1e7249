"""Select the family on the validation split, export ONNX, measure, write the manifest.

Selection uses validation accuracy only (the 5,000 images split off the training set):
greedy forward selection of the ensemble (sum of top-2 probabilities) among all trained
candidates, under the MACs rules of the family (each variant at least 5x cheaper
than the reference, the cheapest at least 20x). The cheapest must also run at least 10x
faster than the reference: its candidates are timed against the reference (onnxruntime,
1 thread, batch 1, one run) and must clear that with a margin, since this machine's speed
drifts by a fifth between runs. Test accuracy is measured after selection and recorded;
it never feeds a choice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from variants import CLASS_NAMES, PACKAGE_DIR, data, ensemble, runtime
from variants.evaluate import measure_latencies

OPSET = 17
MIN_MACS_GAIN = 5.0  # every variant: at least 5x fewer MACs than the reference
MIN_CHEAPEST_GAIN = 20.0  # the cheapest: at least 20x fewer
MIN_CHEAPEST_SPEEDUP = 10.0  # the cheapest: at least 10x faster than the reference
SPEEDUP_MARGIN = 1.25  # ... as measured at selection, times this margin
PARITY_TOL = 1e-4
LATENCY_RUNS = 1000


class ExportError(RuntimeError):
    """Selection or export cannot proceed; the message says why."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _load_model(final: dict[str, Any]) -> Any:
    from variants.train import Recipe, build_model

    model = build_model(Recipe(**final["recipe"]))
    model.load_state_dict(final["model"])
    return model.eval()


def _torch_probs(model: Any, x: np.ndarray, batch: int = 500) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(x[i : i + batch])).numpy())
    return _softmax(np.concatenate(outs))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(model: Any, path: Path) -> None:
    """Write model + softmax as ONNX with the shared interface; check parity with torch."""
    import torch

    from variants.models import WithSoftmax

    wrapped = WithSoftmax(model).eval()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter is the one that writes a plain, dependency-free graph
        # at opset 17; torch warns that it is no longer the default.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["probs"],
            dynamic_axes={"input": {0: "N"}, "probs": {0: "N"}},
            opset_version=OPSET,
            dynamo=False,
        )
    got = runtime.predict(path, x.numpy())
    with torch.no_grad():
        want = wrapped(x).numpy()
    diff = float(np.abs(got - want).max())
    if diff > PARITY_TOL:
        raise ExportError(
            f"{path}: ONNX output differs from PyTorch by {diff:.2e} (> {PARITY_TOL})"
        )


def select(
    finals: dict[str, dict[str, Any]],
    val_probs: dict[str, np.ndarray],
    labels: np.ndarray,
    macs: dict[str, int],
    min_members: int,
    max_members: int,
    speedups: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Choose the family on validation data; returns the members and the reasoning.

    ``speedups`` (reference latency / candidate latency, measured in one run) rules out
    cheap candidates too slow to be the cheapest member; None: MACs alone decide.
    """
    ref_macs = macs["reference"]
    eligible = {n for n in finals if n != "reference" and ref_macs / macs[n] >= MIN_MACS_GAIN}
    # Every trained candidate competes: members may share an architecture and differ by
    # seed or distillation (an ensemble gains from any diversity, measured on validation).
    pool = sorted(eligible)
    cheap = [n for n in pool if ref_macs / macs[n] >= MIN_CHEAPEST_GAIN]
    if len(pool) < min_members or not cheap:
        raise ExportError(
            f"only {len(pool)} eligible candidates ({len(cheap)} at >= "
            f"{MIN_CHEAPEST_GAIN}x fewer MACs); need {min_members} and one cheap"
        )
    # The cheapest member anchors the family: of the >=20x candidates fast enough, the one
    # whose family (the rest added greedily by validation ensemble accuracy, ties to
    # fewer MACs) is the most accurate on validation; ties to the more accurate anchor.
    need = MIN_CHEAPEST_SPEEDUP * SPEEDUP_MARGIN
    fast = cheap if speedups is None else [n for n in cheap if speedups.get(n, 0.0) >= need]
    if not fast:
        raise ExportError(
            f"no candidate with >= {MIN_CHEAPEST_GAIN}x fewer MACs runs >= {need:g}x faster "
            f"than the reference (measured: {speedups}); train a shallower or smaller one"
        )
    # A cheap candidate too slow to anchor is left out altogether: it could otherwise
    # join as the family's cheapest member.
    pool = [n for n in pool if n not in cheap or n in fast]
    families = {
        a: ensemble.greedy_forward(
            {n: val_probs[n] for n in pool},
            labels,
            start=[a],
            min_members=min_members,
            max_members=max_members,
            cost={n: float(macs[n]) for n in pool},
        )
        for a in fast
    }
    anchor = max(fast, key=lambda a: (families[a][-1][1], finals[a]["val_accuracy"], -macs[a]))
    steps = families[anchor]
    members = sorted((n for n, _ in steps), key=lambda n: macs[n])
    return {
        "members": members,
        "anchor": anchor,
        "greedy_steps": [{"added": n, "val_ensemble_accuracy": round(a, 5)} for n, a in steps],
        "anchor_families": {a: round(f[-1][1], 5) for a, f in sorted(families.items())},
        "candidates": {
            n: {
                "val_accuracy": round(finals[n]["val_accuracy"], 5),
                "macs": macs[n],
                "eligible": n in eligible,
                **({"speedup": round(speedups[n], 2)} if speedups and n in speedups else {}),
            }
            for n in sorted(finals)
            if n != "reference"
        },
        "rule": f"candidates with >= {MIN_MACS_GAIN}x fewer MACs than the reference; the "
        f"cheapest member is, of the candidates with >= {MIN_CHEAPEST_GAIN}x fewer MACs"
        + (
            ""
            if speedups is None
            else f" that ran >= {need:g}x faster than the reference when timed at selection "
            f"(the {MIN_CHEAPEST_SPEEDUP:g}x target x a {SPEEDUP_MARGIN:g} margin)"
        )
        + ", the one whose family is the most accurate on validation; the rest are added "
        f"by greedy forward selection on val ensemble accuracy (sum of top-2), "
        f"{min_members}..{max_members} members",
    }


def _cheap_speedups(models: dict[str, Any], macs: dict[str, int], folder: Path) -> dict[str, float]:
    """Reference latency / latency of every candidate cheap enough to be the cheapest
    member, all measured in one run (latency does not depend on the weights' values)."""
    ref_macs = macs["reference"]
    names = ["reference"] + [
        n for n in models if n != "reference" and ref_macs / macs[n] >= MIN_CHEAPEST_GAIN
    ]
    paths = {}
    for n in names:
        paths[n] = folder / f"{n}.onnx"
        export_onnx(models[n], paths[n])
    lat = measure_latencies(paths, LATENCY_RUNS)
    ref = lat["reference"]["median_ms"]
    speedups = {n: ref / lat[n]["median_ms"] for n in names if n != "reference"}
    print(json.dumps({"event": "select.speedups", **{n: round(v, 2) for n, v in speedups.items()}}))
    return speedups


def select_and_export(
    run_dir: Path, plan: list[Any], args: argparse.Namespace, do_export: bool = True
) -> dict[str, Any]:
    import torch

    from variants.models import count_macs, count_params

    finals: dict[str, dict[str, Any]] = {}
    for r in plan:
        path = run_dir / r.name / "final.pt"
        if path.exists():
            finals[r.name] = torch.load(path, map_location="cpu", weights_only=False)
    if "reference" not in finals:
        raise ExportError(f"no trained reference under {run_dir}; run python -m variants.train")
    _, val = data.split_train_val(data.load_split("train"))
    val_x, val_y = val.as_float(), val.labels
    models = {n: _load_model(f) for n, f in finals.items()}
    macs = {n: count_macs(m) for n, m in models.items()}
    val_probs = {n: _torch_probs(m, val_x) for n, m in models.items()}
    for n, final in finals.items():  # val accuracy recomputed here, in eval mode on the CPU
        final["val_accuracy"] = ensemble.accuracy(val_probs[n].argmax(1), val_y)
    speedups = _cheap_speedups(models, macs, run_dir / "latency")
    selection = select(finals, val_probs, val_y, macs, args.min_members, args.max_members, speedups)
    (run_dir / "selection.json").write_text(json.dumps(selection, indent=2))
    print(json.dumps({"event": "select.done", "members": selection["members"]}))
    if not do_export:
        return selection

    out_dir: Path = args.out_dir or PACKAGE_DIR
    models_dir = out_dir / "models"
    if models_dir.exists():
        shutil.rmtree(models_dir)
    test = data.load_split("test")
    test_x, test_y = test.as_float(), test.labels
    entries = []
    names = ["reference"] + selection["members"]
    for i, n in enumerate(names):
        shipped = "reference" if n == "reference" else f"V{i}"
        path = models_dir / f"{shipped.lower()}.onnx"
        export_onnx(models[n], path)
        probs = runtime.predict(path, test_x)
        recipe = finals[n]["recipe"]
        entries.append(
            {
                "name": shipped,
                "role": "reference" if n == "reference" else "variant",
                "file": str(path.relative_to(out_dir)),
                "sha256": sha256_file(path),
                "params": count_params(models[n]),
                "macs": macs[n],
                "resolution": recipe["resolution"],
                "width": recipe["width"],
                "depth": recipe["depth"],
                "val_accuracy": round(finals[n]["val_accuracy"], 5),
                "test_accuracy": round(ensemble.accuracy(probs.argmax(1), test_y), 5),
                "latency_ms": None,  # measured below, every model in one run
                "recipe": {
                    "command": f"python -m variants.train --plan {args.plan} --only {n}",
                    "candidate": n,
                    "seed": recipe["seed"],
                    "epochs": recipe["epochs"],
                    "distilled": recipe["distill"],
                    "trained_on": finals[n].get("device"),
                    **{
                        k: recipe[k]
                        for k in ("lr", "batch", "weight_decay", "label_smoothing", "erase_p")
                    },
                },
            }
        )
        print(
            json.dumps(
                {
                    "event": "export.model",
                    "name": shipped,
                    "candidate": n,
                    "test_accuracy": entries[-1]["test_accuracy"],
                    "macs": macs[n],
                }
            )
        )
    # Latency: every model in one run, as the evaluation measures it, so the ratios
    # against the reference hold on a machine whose speed drifts.
    paths = {e["name"]: out_dir / e["file"] for e in entries}
    lat = measure_latencies(paths, LATENCY_RUNS)
    for e in entries:
        e["latency_ms"] = round(lat[e["name"]]["median_ms"], 4)
    manifest = {
        "schema": 1,
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist); test = t10k, held out",
        "input": {
            "name": "input",
            "shape": [None, 1, 28, 28],
            "dtype": "float32",
            "scale": "pixel/255",
        },
        "output": {
            "name": "probs",
            "shape": [None, 10],
            "dtype": "float32",
            "meaning": "softmax probabilities",
        },
        "class_names": list(CLASS_NAMES),
        "models": entries,
        "selection": selection,
        "latency": {
            "runtime": f"onnxruntime CPU, 1 thread, batch 1, median of {LATENCY_RUNS} runs "
            "per model, in blocks rotated across models",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        json.dumps(
            {
                "event": "export.manifest",
                "path": str(out_dir / "manifest.json"),
                "models": len(entries),
            }
        )
    )
    return manifest


__all__ = [
    "ExportError",
    "export_onnx",
    "select",
    "select_and_export",
    "sha256_file",
]
