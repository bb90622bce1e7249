"""The comparison's report: ``report.json``, ``report.md`` (one table) and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from sim.baselines import split
from variants import MANIFEST_PATH

COLUMNS: Final = (
    "swarm",
    "phase",
    "accuracy",
    "accuracy_on_crash_images",
    "answered",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "throughput",
    "bytes_per_image",
    "answerable",
)


# What the report keeps of each class-parallel sub-model in the subnets manifest.
SUBNET_FIELDS: Final = (
    "name",
    "classes",
    "params",
    "macs",
    "test_accuracy",
    "latency_ms",
    "speedup",
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "answerable":
        return (
            "all 10" if len(value) == 10 else ("none" if not value else ",".join(map(str, value)))
        )
    if isinstance(value, float):
        return f"{value:.4f}" if key.startswith(("accuracy", "answered")) else f"{value:g}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def model_table(subnets: Path, stages: Path) -> dict[str, Any]:
    """What each approach's devices run: variants, stages, sub-models (from their files)."""
    family = json.loads(MANIFEST_PATH.read_text())["models"]
    out: dict[str, Any] = {
        "variants": [
            {k: m.get(k) for k in ("name", "role", "params", "macs", "test_accuracy", "latency_ms")}
            for m in family
        ]
    }
    out["stages"] = {
        p.stem: [s.__dict__ for s in split.load_plan(stages, int(p.stem.removeprefix("stages")))]
        for p in sorted(stages.glob("stages*.json"))
    }
    path = subnets / "manifest.json"
    if path.exists():
        sub = json.loads(path.read_text())
        out["subnets_reference"] = sub["reference"]
        out["subnets"] = [
            {
                "grouping": g["name"],
                "grouping_test_accuracy": g["test_accuracy"],
                **{k: m.get(k) for k in SUBNET_FIELDS},
            }
            for g in sub["groupings"]
            for m in g["members"]
        ]
    return out


def write(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    rows = report["results"]
    md = [
        "# Variant, model and class parallelism, measured side by side",
        "",
        f"Real processes on {report['network']} (one per device, one inference thread each). "
        f"Healthy: the first {report['images']} t10k test images, one call at a time; "
        f"throughput: {report['throughput_images']} images at {report['concurrency']} calls in "
        f"flight; crashes: {report['crash_images']} images after one, then a second device is "
        f"killed (SIGKILL). Deadline {report['deadline_ms']} ms per call. Bytes: TCP payload "
        "through the devices' sockets per image, both directions (kernel counters). "
        f"Run took {report['seconds']} s.",
        "",
        table(rows, COLUMNS),
    ]
    models = report.get("models", {})
    if models.get("subnets"):
        ref = models["subnets_reference"]
        md += [
            "## Class-parallel sub-models (sensAI-style) against the reference",
            "",
            f"Reference latency in the same timing run: {ref['latency_ms']} ms "
            "(onnxruntime, 1 thread, batch 1). Sub-model accuracy is on its own task "
            "(its classes plus 'other'), on t10k.",
            "",
            table(models["subnets"], ["grouping", *SUBNET_FIELDS]),
        ]
    for name, plan in models.get("stages", {}).items():
        md += [
            f"## Model-parallel {name}",
            "",
            table(plan, ["index", "macs", "params", "output_shape"]),
        ]
    (out / "report.md").write_text("\n".join(md))
    return [out / "report.json", out / "report.md", *_plots(rows, out)]


def _plots(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib  # noqa: PLC0415  # the sim extra's; only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  # after matplotlib.use

    colors = {"variant": "tab:blue", "model": "tab:red", "class": "tab:green"}
    files = []
    swarms = list(dict.fromkeys(r["swarm"] for r in rows))
    by = {s: [r for r in rows if r["swarm"] == s] for s in swarms}
    approach = {s: by[s][0]["approach"] for s in swarms}

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for s in swarms:
        pts = sorted(
            (r["crashed"], r["accuracy"], r["answered"])
            for r in by[s]
            if "crashed" in r and not r["phase"].startswith("concurrency")
        )
        style = {"variant": "-", "model": ":", "class": "--"}[approach[s]]
        axes[0].plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            style,
            marker="o",
            color=colors[approach[s]],
            label=s,
        )
        axes[1].plot(
            [p[0] for p in pts],
            [p[2] for p in pts],
            style,
            marker="o",
            color=colors[approach[s]],
            label=s,
        )
    for ax, what in zip(axes, ("accuracy", "answered fraction"), strict=True):
        ax.set_xlabel("devices crashed")
        ax.set_ylabel(what)
        ax.set_xticks([0, 1, 2])
    axes[1].legend(fontsize=6)
    files.append(_save(fig, out / "crash.png"))

    healthy = [next(r for r in by[s] if r["phase"] == "healthy") for s in swarms]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [r["swarm"] for r in healthy]
    cols = [colors[r["approach"]] for r in healthy]
    axes[0].barh(names, [r["bytes_per_image"] / 1000 for r in healthy], color=cols)
    axes[0].set_xlabel("kB on the wire per image")
    axes[1].barh(names, [r["p50_ms"] or 0 for r in healthy], color=cols, label="p50")
    axes[1].scatter([r["p99_ms"] or 0 for r in healthy], names, color="black", s=10, label="p99")
    axes[1].set_xlabel("latency (ms)")
    axes[1].legend(fontsize=7)
    conc = [next((r for r in by[s] if r["phase"].startswith("concurrency")), None) for s in swarms]
    axes[2].barh(
        names, [(c or h)["throughput"] or 0 for c, h in zip(conc, healthy, strict=True)], color=cols
    )
    axes[2].set_xlabel("throughput (images/s)")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    files.append(_save(fig, out / "costs.png"))
    return files


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415  # after matplotlib.use

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
