"""Writing a run's report: ``report.json`` (what other tools read), ``report.md``, PNG plots,
and ``report.html`` (``sim.pages``: the report and its plots as one page)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from sim import pages
from sim.runners.common import Report

_COLUMNS: Final = (
    "rule",
    "f",
    "attack",
    "mode",
    "phase",
    "side",
    "variants",
    "macs",
    "hung",
    "slowed",
    "hedging",
    "early_exit",
    "accuracy",
    "requests",
    "answered",
    "errors",
    "lost",
    "p50_ms",
    "p99_ms",
    "liar_rejected",
    "liar_counted",
    "decided_while_any_alive",
    "min_alive",
    "variants_used",
)
_NOT_IN_MARKDOWN: Final = ("timeline",)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if value <= 1.0 else f"{value:.1f}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` over the columns any of them has."""
    if not rows:
        return "(no results)\n"
    wanted = columns or [c for c in _COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(wanted) + " |", "|" + "---|" * len(wanted)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in wanted) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(report: Report, out: Path) -> list[Path]:
    """Write report.json, report.md and the plots into ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    data = report.as_json()
    (out / "report.json").write_text(json.dumps(data, indent=1) + "\n")
    md = [
        f"# Scenario `{report.scenario}` ({report.kind})",
        "",
        f"{report.peers} peers, {report.images} held-out test images; clean accuracy "
        f"{_cell(report.clean_accuracy)}.",
        "",
    ]
    if "method" in data:
        md += [f"Method: {data['method']}", ""]
    if report.targets:
        md += ["## Targets", ""]
        md += [
            f"- {'PASS' if t['ok'] else 'FAIL'}: {t['target']} ({t['detail']})"
            for t in report.targets
        ]
        md.append("")
    md += ["## Results", "", table(report.results)]
    for key, value in report.extra.items():
        if key in _NOT_IN_MARKDOWN:
            continue
        if isinstance(value, list) and value and isinstance(value[0], dict):
            md += [f"## {key}", "", table(value, list(value[0]))]
    (out / "report.md").write_text("\n".join(md))
    files = [out / "report.json", out / "report.md"]
    files += _plots(report, out)
    files.append(pages.write_page(out))  # report.md and the plots as one page
    return files


def _plots(report: Report, out: Path) -> list[Path]:
    import matplotlib  # noqa: PLC0415  # the sim extra's; only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  # after matplotlib.use

    files: list[Path] = []
    rows = report.results
    if report.kind == "byzantine":
        attacks = sorted({r["attack"] for r in rows if r["attack"] != "none"})
        cols = min(4, max(1, len(attacks)))
        nrows = max(1, math.ceil(len(attacks) / cols))
        fig, axes = plt.subplots(
            nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), sharey=True, squeeze=False
        )
        for ax, attack in zip(axes.flat, attacks, strict=False):
            for rule in sorted({r["rule"] for r in rows}):
                pts = sorted(
                    (r["f"], r["accuracy"])
                    for r in rows
                    if r["rule"] == rule
                    and r.get("mode") == "gathered"
                    and r["attack"] in (attack, "none")
                )
                if pts:
                    # robust often coincides with trimmed: dashed, so both show.
                    style = "--" if rule == "robust" else "-"
                    ax.plot(*zip(*pts, strict=True), style, marker="o", label=rule)
            ax.set_title(attack)
            ax.set_xlabel("liars f")
        for row in axes:
            row[0].set_ylabel("accuracy")
        axes[0][0].legend(fontsize=7)
        files.append(_save(fig, out / "byzantine.png"))
    elif report.kind == "paper":
        combos = report.extra.get("combinations", [])
        if combos:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.scatter([c["macs"] / 1e6 for c in combos], [c["accuracy"] for c in combos], s=12)
            ax.set_xlabel("total MACs (millions)")
            ax.set_ylabel("accuracy")
            ax.set_title("variant combinations through the swarm")
            files.append(_save(fig, out / "accuracy_vs_macs.png"))
    timeline = report.extra.get("timeline")
    if timeline:
        fig, ax = plt.subplots(figsize=(7, 3))
        for ok, size, color, label in (
            (True, 4, "tab:blue", "decided"),
            (False, 8, "red", "error"),
        ):
            marks: list[dict[str, Any]] = [m for m in timeline if m["ok"] is ok]
            if marks:
                ax.scatter(
                    [m["t"] for m in marks],
                    [m["latency_ms"] for m in marks],
                    s=size,
                    c=color,
                    label=label,
                )
        for fault in report.extra.get("faults", []):
            ax.axvline(fault["t_s"], color="grey", lw=0.6)
        ax.set_xlabel("seconds")
        ax.set_ylabel("latency (ms)")
        ax.legend(fontsize=7)
        files.append(_save(fig, out / "timeline.png"))
    return files


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt  # noqa: PLC0415  # after matplotlib.use

    plt.close(fig)
    return path
