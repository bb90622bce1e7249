"""A member's latency budget on the target device, and the device profiles that scale it.

``--budget-ms MS`` is the time one member may take per image (batch 1, one thread) on the
target device. Latency is measured here with ONNX Runtime and multiplied by the device's
factor: 1 for this machine, a stored estimate for a named device (``--device-profile``),
or a measured one: run ``python -m variants.budget --out dev.json`` on the device and
``--device-profile dev.json`` here, and the factor is the ratio of the same probe models'
latency there and here. Latency does not depend on the weights' values, so the pool is
pruned before training by timing untrained graphs, and checked again at selection.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from variants.data import DatasetError

# Factors against one x86-64 core of the machine the shipped family was measured on.
# Estimates, not measurements: ONNX Runtime single-thread latency of small CNNs on a
# Cortex-A72 (Raspberry Pi 4, 1.5-1.8 GHz) runs several times slower than on a desktop
# x86 core; measure the device (see the module docstring) to replace them.
PROFILES: dict[str, dict[str, Any]] = {
    "here": {"factor": 1.0, "measured": True, "note": "this machine, measured now"},
    "rpi4": {
        "factor": 6.0,
        "measured": False,
        "note": "Raspberry Pi 4 (Cortex-A72): an estimate; measure the device to replace it",
    },
    "rpi5": {
        "factor": 2.5,
        "measured": False,
        "note": "Raspberry Pi 5 (Cortex-A76): an estimate; measure the device to replace it",
    },
}
PROBE_RUNS = 300


@dataclass(frozen=True)
class Profile:
    name: str
    factor: float
    measured: bool
    note: str

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "factor": self.factor,
            "measured": self.measured,
            "note": self.note,
        }


def probe_paths() -> dict[str, Path]:
    """The probe models: the shipped Fashion-MNIST family's reference and V1."""
    from variants import FAMILIES_DIR

    folder = FAMILIES_DIR / "fashion-mnist" / "models"
    return {"reference": folder / "reference.onnx", "V1": folder / "v1.onnx"}


def measure_probe(runs: int = PROBE_RUNS) -> dict[str, float]:
    from variants.evaluate import measure_latencies

    lat = measure_latencies(probe_paths(), runs)
    return {n: round(v["median_ms"], 4) for n, v in lat.items()}


def load_profile(name: str) -> Profile:
    """A named profile, or a profile file written by this module on the device."""
    if name in PROFILES:
        p = PROFILES[name]
        return Profile(name, float(p["factor"]), bool(p["measured"]), str(p["note"]))
    path = Path(name)
    if not path.is_file():
        raise DatasetError(
            f"--device-profile {name!r} is neither a known device ({', '.join(PROFILES)}) nor "
            "a file; write one on the device with: python -m variants.budget --out FILE"
        )
    try:
        raw = json.loads(path.read_text())
        there = {str(k): float(v) for k, v in raw["probe_ms"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(
            f"{path} is not a device profile ({exc}); write one with python -m variants.budget"
        ) from exc
    here = measure_probe()
    ratios = [there[n] / here[n] for n in here if n in there and here[n] > 0]
    if not ratios:
        raise DatasetError(f"{path} holds no latency of the probe models {sorted(here)}")
    factor = round(sum(ratios) / len(ratios), 3)
    return Profile(
        str(raw.get("device", path.stem)),
        factor,
        True,
        f"measured: probe models there {there} ms, here {here} ms",
    )


def within_budget(
    latency_ms: dict[str, float], budget_ms: float, profile: Profile
) -> tuple[set[str], dict[str, float]]:
    """The names whose latency on the target device (here x factor) fits the budget."""
    target = {n: round(ms * profile.factor, 4) for n, ms in latency_ms.items()}
    return {n for n, ms in target.items() if ms <= budget_ms}, target


def untrained_latencies(recipes: list[Any], splits: Any, folder: Path) -> dict[str, float]:
    """Batch-1, one-thread latency here of each recipe's (untrained) graph."""
    from variants.evaluate import measure_latencies
    from variants.export import export_onnx
    from variants.trainer import build_model

    paths = {}
    for r in recipes:
        paths[r.name] = folder / f"{r.name}.onnx"
        if not paths[r.name].exists():
            export_onnx(build_model(r, splits).eval(), paths[r.name])
    lat = measure_latencies(paths, PROBE_RUNS)
    return {n: v["median_ms"] for n, v in lat.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m variants.budget",
        description="Measure this device's latency on the probe models and write a profile "
        "for --device-profile.",
    )
    p.add_argument("--out", type=Path, required=True, help="profile file to write (JSON)")
    p.add_argument("--name", default=platform.node() or "device")
    args = p.parse_args(argv)
    probe = measure_probe()
    args.out.write_text(
        json.dumps(
            {
                "device": args.name,
                "machine": platform.machine(),
                "probe_ms": probe,
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
        + "\n"
    )
    print(json.dumps({"event": "profile.written", "path": str(args.out), "probe_ms": probe}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
