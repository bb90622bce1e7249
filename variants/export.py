"""Select the family on the validation split, export ONNX, measure, write the folder.

Selection uses validation accuracy only: greedy forward selection of the ensemble (sum of
top-2 probabilities) among all trained candidates, under the family's rules (``Rules``:
each variant some times cheaper than the reference in MACs, the cheapest more so, and for
Fashion-MNIST the cheapest at least 10x faster: its candidates are timed against the
reference, onnxruntime, 1 thread, batch 1, one run, and must clear that with a margin,
since this machine's speed drifts by a fifth between runs). With a latency budget, only
candidates whose latency on the target device fits it are members. Test accuracy is
measured after selection and recorded; it never feeds a choice. The family is written as
a folder: ``manifest.json`` (schema 2) and ``models/*.onnx``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from swarm.inference.manifest import file_sha256
from variants import budget, ensemble, family, runtime
from variants.datasets import Splits
from variants.evaluate import measure_latencies
from variants.plans import FASHION_RULES, Recipe, Rules
from variants.trainer import model_from_final

OPSET = 17
MIN_MACS_GAIN = FASHION_RULES.min_macs_gain
MIN_CHEAPEST_GAIN = FASHION_RULES.min_cheapest_gain
MIN_CHEAPEST_SPEEDUP = 10.0  # the shipped family's cheapest: at least 10x faster
SPEEDUP_MARGIN = 1.25  # ... as measured at selection, times this margin
PARITY_TOL = 1e-4
LATENCY_RUNS = 1000


class ExportError(RuntimeError):
    """Selection or export cannot proceed; the message says why."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _torch_probs(model: Any, images: Any, batch: int = 500) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = np.asarray(images[i : i + batch], dtype=np.float32) / np.float32(255.0)
            outs.append(model(torch.from_numpy(x)).numpy())
    return _softmax(np.concatenate(outs))


def export_onnx(model: Any, path: Path) -> None:
    """Write model + softmax as ONNX with the family's interface; check parity with torch."""
    import torch

    from variants.models import WithSoftmax

    wrapped = WithSoftmax(model).eval()
    fmt = model.fmt
    x = torch.rand(4, fmt.channels, fmt.size, fmt.size, generator=torch.Generator().manual_seed(0))
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
    rules: Rules = FASHION_RULES,
    allowed: set[str] | None = None,
) -> dict[str, Any]:
    """Choose the family on validation data; returns the members and the reasoning.

    ``speedups`` (reference latency / candidate latency, measured in one run) rules out
    cheap candidates too slow to be the cheapest member; None: MACs alone decide.
    ``allowed``: the candidates within the latency budget (None: no budget).
    """
    ref_macs = macs["reference"]
    gain, cheap_gain = rules.min_macs_gain, rules.min_cheapest_gain
    eligible = {
        n
        for n in finals
        if n != "reference" and ref_macs / macs[n] >= gain and (allowed is None or n in allowed)
    }
    # Every trained candidate competes: members may share an architecture and differ by
    # seed or distillation (an ensemble gains from any diversity, measured on validation).
    pool = sorted(eligible)
    cheap = [n for n in pool if ref_macs / macs[n] >= cheap_gain]
    if len(pool) < min_members or not cheap:
        raise ExportError(
            f"only {len(pool)} eligible candidates ({len(cheap)} at >= {cheap_gain}x fewer "
            f"MACs{'' if allowed is None else ', within the latency budget'}); need "
            f"{min_members} and one cheap: train more candidates, lower --min-members"
            + ("" if allowed is None else " or raise --budget-ms")
        )
    # The cheapest member anchors the family: of the cheap candidates fast enough, the one
    # whose family (the rest added greedily by validation ensemble accuracy, ties to
    # fewer MACs) is the most accurate on validation; ties to the more accurate anchor.
    target = rules.min_cheapest_speedup
    need = (target or 0.0) * SPEEDUP_MARGIN
    fast = (
        cheap
        if speedups is None or target is None
        else [n for n in cheap if speedups.get(n, 0.0) >= need]
    )
    if not fast:
        raise ExportError(
            f"no candidate with >= {cheap_gain}x fewer MACs runs >= {need:g}x faster "
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
    timed = speedups is not None and target is not None
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
                **({} if allowed is None else {"within_budget": n in allowed}),
            }
            for n in sorted(finals)
            if n != "reference"
        },
        "rule": f"candidates with >= {gain:g}x fewer MACs than the reference"
        + ("" if allowed is None else " within the latency budget")
        + f"; the cheapest member is, of the candidates with >= {cheap_gain:g}x fewer MACs"
        + (
            f" that ran >= {need:g}x faster than the reference when timed at selection "
            f"(the {target:g}x target x a {SPEEDUP_MARGIN:g} margin)"
            if timed
            else ""
        )
        + ", the one whose family is the most accurate on validation; the rest are added "
        f"by greedy forward selection on val ensemble accuracy (sum of top-2), "
        f"{min_members}..{max_members} members",
    }


def _latencies(
    models: dict[str, Any], names: list[str], folder: Path, runs: int = LATENCY_RUNS
) -> dict[str, float]:
    """Batch-1, one-thread latency of the named models, all measured in one run
    (latency does not depend on the weights' values)."""
    paths = {}
    for n in names:
        paths[n] = folder / f"{n}.onnx"
        export_onnx(models[n], paths[n])
    lat = measure_latencies(paths, runs)
    return {n: lat[n]["median_ms"] for n in names}


def _manifest_entry(
    shipped: str,
    n: str,
    out_dir: Path,
    path: Path,
    final: dict[str, Any],
    model: Any,
    macs: int,
    test_acc: float,
    data_flag: str,
    plan: str,
) -> dict[str, Any]:
    from variants.models import count_params
    from variants.plans import recipe_from_dict

    recipe = recipe_from_dict(final["recipe"])
    return {
        "name": shipped,
        "role": "reference" if n == "reference" else "variant",
        "file": str(path.relative_to(out_dir)),
        "sha256": file_sha256(path),
        "params": count_params(model),
        "macs": macs,
        "resolution": recipe.resolution,
        "width": recipe.width,
        "depth": recipe.depth,
        "val_accuracy": round(final["val_accuracy"], 5),
        "test_accuracy": round(test_acc, 5),
        "latency_ms": None,  # measured below, every model in one run
        "recipe": {
            "command": f"python -m variants.train --data {data_flag} --plan {plan} "
            + (f"--recipe joint --only {n}" if recipe.joint else f"--only {n}"),
            "kind": "joint" if recipe.joint else "independent",
            "candidate": n,
            "seed": recipe.seed,
            "epochs": recipe.epochs,
            "distilled": recipe.distill,
            "trained_on": final.get("device"),
            "lr": recipe.lr,
            "batch": recipe.batch,
            "weight_decay": recipe.weight_decay,
            "label_smoothing": recipe.label_smoothing,
            "erase_p": recipe.erase_p,
            **(
                {"joint_group": recipe.joint, "joint_beta": recipe.joint_beta}
                if recipe.joint
                else {}
            ),
        },
    }


def select_and_export(
    run_dir: Path,
    plan: list[Recipe],
    args: argparse.Namespace,
    splits: Splits,
    rules: Rules = FASHION_RULES,
    do_export: bool = True,
) -> dict[str, Any]:
    """Select on validation, export the members and the reference, write the family."""
    import torch

    from variants.models import count_macs

    finals: dict[str, dict[str, Any]] = {}
    for r in plan:
        path = run_dir / r.name / "final.pt"
        if path.exists():
            finals[r.name] = torch.load(path, map_location="cpu", weights_only=False)
    if "reference" not in finals:
        raise ExportError(f"no trained reference under {run_dir}; run python -m variants.train")
    val_y = np.asarray(splits.val.labels)
    models = {n: model_from_final(f) for n, f in finals.items()}
    macs = {n: count_macs(m) for n, m in models.items()}
    val_probs = {n: _torch_probs(m, splits.val.images) for n, m in models.items()}
    for n, final in finals.items():  # val accuracy recomputed here, in eval mode on the CPU
        final["val_accuracy"] = ensemble.accuracy(val_probs[n].argmax(1), val_y)
    ref_macs = macs["reference"]
    budget_ms: float | None = getattr(args, "budget_ms", None)
    profile = budget.load_profile(getattr(args, "device_profile", "here"))
    timed = (
        [n for n in models if n != "reference"]
        if budget_ms is not None
        else [
            n
            for n in models
            if n != "reference"
            and rules.min_cheapest_speedup is not None
            and ref_macs / macs[n] >= rules.min_cheapest_gain
        ]
    )
    speedups = target_ms = None
    allowed: set[str] | None = None if budget_ms is None else set()
    if timed:
        lat = _latencies(
            models,
            ["reference", *timed],
            run_dir / "latency",
            getattr(args, "latency_runs", LATENCY_RUNS),
        )
        speedups = {n: lat["reference"] / lat[n] for n in timed}
        print(
            json.dumps(
                {"event": "select.speedups", **{n: round(v, 2) for n, v in speedups.items()}}
            )
        )
        if budget_ms is not None:
            allowed, target_ms = budget.within_budget(
                {n: lat[n] for n in timed}, budget_ms, profile
            )
    selection = select(
        finals,
        val_probs,
        val_y,
        macs,
        args.min_members,
        args.max_members,
        speedups if rules.min_cheapest_speedup is not None else None,
        rules,
        allowed,
    )
    if budget_ms is not None:
        selection["budget"] = {
            "budget_ms": budget_ms,
            "device_profile": profile.describe(),
            "target_latency_ms": target_ms,
        }
    (run_dir / "selection.json").write_text(json.dumps(selection, indent=2))
    print(json.dumps({"event": "select.done", "members": selection["members"]}))
    if not do_export:
        return selection
    return export_family(selection, finals, models, macs, splits, args, Path(args.out_dir))


def export_family(
    selection: dict[str, Any],
    finals: dict[str, dict[str, Any]],
    models: dict[str, Any],
    macs: dict[str, int],
    splits: Splits,
    args: argparse.Namespace,
    out_dir: Path,
    recipes: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Export the reference and the members to ``out_dir`` and write its manifest.

    ``recipes``: manifest recipe entries that replace the default ones, by candidate.
    """
    models_dir = out_dir / "models"
    if models_dir.exists():
        shutil.rmtree(models_dir)
    test_y = np.asarray(splits.test.labels)
    entries = []
    names = ["reference", *selection["members"]]
    for i, n in enumerate(names):
        shipped = "reference" if n == "reference" else f"V{i}"
        path = models_dir / f"{shipped.lower()}.onnx"
        export_onnx(models[n], path)
        probs = runtime.predict_images(path, splits.test.images)
        entries.append(
            _manifest_entry(
                shipped,
                n,
                out_dir,
                path,
                finals[n],
                models[n],
                macs[n],
                ensemble.accuracy(probs.argmax(1), test_y),
                args.data,
                args.plan,
            )
        )
        if recipes and n in recipes:
            entries[-1]["recipe"] = recipes[n]
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
    runs = getattr(args, "latency_runs", LATENCY_RUNS)
    lat = measure_latencies(paths, runs)
    for e in entries:
        e["latency_ms"] = round(lat[e["name"]]["median_ms"], 4)
    manifest = {
        "schema": family.SCHEMA,
        "family": family.family_object(args.family_name or splits.name, entries),
        "dataset": splits.describe(),
        "input": family.input_object(
            splits.input.channels, splits.input.size, splits.mean, splits.std
        ),
        "output": family.output_object(splits.num_classes),
        "class_names": list(splits.class_names),
        "models": entries,
        "selection": selection,
        "latency": {
            "runtime": f"onnxruntime CPU, 1 thread, batch 1, median of {runs} runs "
            "per model, in blocks rotated across models",
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    path = family.write_manifest(out_dir, manifest)
    print(
        json.dumps(
            {
                "event": "export.manifest",
                "path": str(path),
                "models": len(entries),
                "family_id": manifest["family"]["id"],
            }
        )
    )
    return manifest


__all__ = [
    "ExportError",
    "export_family",
    "export_onnx",
    "select",
    "select_and_export",
]
