"""Evaluate a family's ONNX files on its held-out test set (onnxruntime only).

    python -m variants.evaluate [--family DIR] [--out DIR] [--runs N]

Reproduces the three results of the Variant Parallelism paper, measured here:
1. per model: test accuracy, params, MACs, latency (onnxruntime, 1 thread, batch 1,
   median of many runs) and, against the reference in the same run, speedup, MACs gain and
   params gain;
2. ensemble accuracy against total MACs for every subset of the variants, with the
   paper's aggregation (sum of top-k probabilities; k = 2, also 1 and 3);
3. the accuracy of the whole ensemble with each variant left out.
Writes DIR/evaluation.md, DIR/evaluation.json and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from variants import DEFAULT_FAMILY_DIR, datasets, ensemble, runtime

KS = (1, 2, 3)


def measure_latencies(
    paths: dict[str, Path], runs: int, block: int = 50, warmup: int = 50
) -> dict[str, dict[str, float]]:
    """Batch-1, one-thread latency of every model, in blocks rotated round-robin.

    A device runs one model back to back, so each model is timed in blocks of consecutive
    runs (warm caches, as in deployment); rotating the blocks across models over the whole
    measurement makes every model see the same machine state, so the ratios against the
    reference hold on a noisy machine even when the absolute times drift.
    """
    sessions = {n: runtime.session(p, threads=1) for n, p in paths.items()}
    shapes = {runtime.input_shape(s) for s in sessions.values()}
    if len(shapes) != 1:
        raise ValueError(f"the models take different inputs {sorted(shapes)}; not one family")
    x = np.random.default_rng(0).random((1, *shapes.pop()), dtype=np.float32)
    times: dict[str, list[float]] = {n: [] for n in sessions}
    rounds = max(1, runs // block)
    for _ in range(rounds):
        for n, s in sessions.items():
            for _ in range(warmup // 5):
                s.run(None, {"input": x})
            for _ in range(block):
                t0 = time.perf_counter()
                s.run(None, {"input": x})
                times[n].append(time.perf_counter() - t0)
    out = {}
    for n, ts in times.items():
        arr = np.array(ts) * 1e3
        out[n] = {
            "median_ms": float(statistics.median(arr)),
            "p99_ms": float(np.percentile(arr, 99)),
        }
    return out


def test_split(manifest: dict[str, Any], data: str | None) -> tuple[datasets.Splits, str]:
    """The family's dataset, split as at training (``data`` overrides where it lives)."""
    source = manifest.get("dataset")
    if not isinstance(source, dict):  # schema 1: Fashion-MNIST
        source = {"kind": "fashion-mnist"}
    inp = manifest["input"]
    if data is not None:
        source = {**source, "kind": data if data in datasets.NAMED else "folder", "path": data}
    if source.get("kind") == "folder":
        splits = datasets.load(
            str(source["path"]), None, inp.get("channels"), inp.get("height"), progress=False
        )
    else:
        splits = datasets.from_source(source)
    want = source.get("splits", {}).get("test")
    if want is not None and want != len(splits.test):
        raise datasets.DatasetError(
            f"the test split now has {len(splits.test)} images, the family was measured on "
            f"{want}: the dataset changed since export; evaluate on the data it was made from"
        )
    return splits, str(source.get("description") or splits.name)


def evaluate(manifest_path: Path, runs: int, data: str | None = None) -> dict[str, Any]:
    manifest = json.loads(manifest_path.read_text())
    folder = manifest_path.parent
    models = {m["name"]: m for m in manifest["models"]}
    if "reference" not in models:
        raise SystemExit(f"error: {manifest_path} lists no reference model")
    paths = {n: folder / m["file"] for n, m in models.items()}
    for n, p in paths.items():
        if not p.exists():
            raise SystemExit(
                f"error: model file {p} of {n} is missing; run python -m variants.train"
            )
    splits, described = test_split(manifest, data)
    y = np.asarray(splits.test.labels)
    probs = {n: runtime.predict_images(p, splits.test.images) for n, p in paths.items()}
    lat = measure_latencies(paths, runs)
    ref = models["reference"]
    ref_lat = lat["reference"]["median_ms"]
    per_model = []
    for n, m in models.items():
        per_model.append(
            {
                "name": n,
                "role": m["role"],
                "resolution": m["resolution"],
                "width": m["width"],
                "test_accuracy": ensemble.accuracy(probs[n].argmax(1), y),
                "params": m["params"],
                "macs": m["macs"],
                "latency_ms": lat[n]["median_ms"],
                "latency_p99_ms": lat[n]["p99_ms"],
                "speedup": ref_lat / lat[n]["median_ms"],
                "macs_gain": ref["macs"] / m["macs"],
                "params_gain": ref["params"] / m["params"],
            }
        )
    variants = [n for n in models if models[n]["role"] == "variant"]
    subsets = []
    for combo in ensemble.subsets(variants):
        row: dict[str, Any] = {
            "members": list(combo),
            "total_macs": sum(models[n]["macs"] for n in combo),
        }
        for k in KS:
            row[f"accuracy_k{k}"] = ensemble.ensemble_accuracy([probs[n] for n in combo], y, k)
        subsets.append(row)
    loo = {k: ensemble.leave_one_out({n: probs[n] for n in variants}, y, k) for k in KS}
    full = {f"k{k}": ensemble.ensemble_accuracy([probs[n] for n in variants], y, k) for k in KS}
    family = manifest.get("family", {"name": "fashion-mnist"})
    return {
        "manifest": str(manifest_path),
        "family": family,
        "dataset": described,
        "test_images": len(y),
        "latency_method": f"onnxruntime CPU, 1 thread, batch 1, median of {runs} runs per "
        "model, in blocks of 50 rotated round-robin across models",
        "models": per_model,
        "ensemble_all": full,
        "reference_accuracy": ensemble.accuracy(probs["reference"].argmax(1), y),
        "subsets": subsets,
        "leave_one_out": {f"k{k}": v for k, v in loo.items()},
    }


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def to_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation of the variant family {r['family'].get('name', '')}",
        "",
        f"Held-out test set of {r['dataset']}: {r['test_images']} images. Latency: "
        f"{r['latency_method']}.",
        "",
        "## 1. Each model against the reference (same run)",
        "",
        "| model | res | width | test acc % | params | MACs | latency ms | speedup "
        "| MACs gain | params gain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in r["models"]:
        lines.append(
            f"| {m['name']} | {m['resolution']} | {m['width']} | {_pct(m['test_accuracy'])} "
            f"| {m['params']:,} | {m['macs']:,} | {m['latency_ms']:.3f} "
            f"| {m['speedup']:.1f}x | {m['macs_gain']:.1f}x | {m['params_gain']:.1f}x |"
        )
    ea = r["ensemble_all"]
    lines += [
        "",
        "## 2. Ensembles: accuracy against total MACs (sum of top-k probabilities)",
        "",
        f"All variants: k=1 {_pct(ea['k1'])}%, **k=2 {_pct(ea['k2'])}%**, k=3 "
        f"{_pct(ea['k3'])}%; reference {_pct(r['reference_accuracy'])}% "
        f"(difference at k=2: {100 * (ea['k2'] - r['reference_accuracy']):+.2f} points).",
        "",
        "| members | total MACs | acc k=1 % | acc k=2 % | acc k=3 % |",
        "|---|---|---|---|---|",
    ]
    for s in sorted(r["subsets"], key=lambda s: s["total_macs"]):
        lines.append(
            f"| {'+'.join(s['members'])} | {s['total_macs']:,} | {_pct(s['accuracy_k1'])} "
            f"| {_pct(s['accuracy_k2'])} | {_pct(s['accuracy_k3'])} |"
        )
    lines += [
        "",
        "## 3. The whole ensemble with one variant left out (k=2)",
        "",
        "| left out | accuracy % | change (points) |",
        "|---|---|---|",
    ]
    for n, acc in r["leave_one_out"]["k2"].items():
        lines.append(f"| {n} | {_pct(acc)} | {100 * (acc - ea['k2']):+.2f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, marker in zip(KS, "o^s", strict=True):
        xs = [s["total_macs"] / 1e6 for s in r["subsets"]]
        ax.scatter(
            xs,
            [100 * s[f"accuracy_k{k}"] for s in r["subsets"]],
            marker=marker,
            s=18,
            alpha=0.7,
            label=f"ensembles, top-{k} sum",
        )
    ref = next(m for m in r["models"] if m["role"] == "reference")
    ax.scatter(
        [ref["macs"] / 1e6],
        [100 * ref["test_accuracy"]],
        marker="*",
        s=200,
        color="black",
        label="reference (MobileNetV2 1.0)",
    )
    ax.set_xlabel("total MACs of the ensemble (millions, per image)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Ensemble accuracy against total MACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "ensemble_vs_macs.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ms = r["models"]
    ax.bar([m["name"] for m in ms], [m["latency_ms"] for m in ms], color="tab:blue")
    for i, m in enumerate(ms):
        ax.text(i, m["latency_ms"], f"{m['speedup']:.1f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("latency (ms, 1 thread, batch 1)")
    ax.set_title("Per-model latency and speedup against the reference")
    fig.tight_layout()
    files.append(out / "latency.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    loo = r["leave_one_out"]["k2"]
    ax.bar(list(loo), [100 * v for v in loo.values()], color="tab:orange")
    ax.axhline(100 * r["ensemble_all"]["k2"], color="black", linestyle="--", label="all variants")
    ax.axhline(100 * r["reference_accuracy"], color="tab:red", linestyle=":", label="reference")
    lo = min([*loo.values(), r["reference_accuracy"]]) * 100 - 0.5
    ax.set_ylim(lo, 100 * max([*loo.values(), r["reference_accuracy"]]) + 0.5)
    ax.set_xlabel("variant left out")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "leave_one_out.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m variants.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out/evaluation"),
        help="folder for evaluation.md/.json and plots (default: %(default)s)",
    )
    p.add_argument(
        "--family",
        type=Path,
        default=DEFAULT_FAMILY_DIR,
        help="the family folder (manifest.json + models/; default: the shipped Fashion-MNIST)",
    )
    p.add_argument(
        "--manifest", type=Path, default=None, help="a manifest.json (instead of --family)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="where the family's image folder lives now, if it moved since training",
    )
    p.add_argument("--runs", type=int, default=500, help="latency runs per model")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.runs < 10:
        p.error("--runs must be at least 10")
    manifest = args.manifest or args.family / "manifest.json"
    if not manifest.exists():
        print(
            f"error: manifest {manifest} not found; train and export a family with "
            "python -m variants.train",
            file=sys.stderr,
        )
        return 2
    try:
        r = evaluate(manifest, args.runs, args.data)
    except datasets.DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(r, indent=2) + "\n")
    md = to_markdown(r)
    (args.out / "evaluation.md").write_text(md)
    if not args.no_plots:
        plot(r, args.out)
    head = md.split("## 2.")[0]
    print(head)
    print(md.split("\n\n")[5] if md.count("\n\n") > 5 else "")
    print(
        f"written: {args.out}/evaluation.md, evaluation.json"
        + ("" if args.no_plots else ", ensemble_vs_macs.png, latency.png, leave_one_out.png")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
