"""A short ``sim.run compare``: real processes, tiny counts; the report's shape, and a
crashed stage is "no answer" within the deadline, never a hang."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.run import main as sim_main
from sim.runners import compare
from tests.sim.conftest import assert_nothing_left

pytestmark = pytest.mark.slow


def test_compare_short_run_reports_every_swarm_and_phase(tmp_path: Path) -> None:
    approaches = (
        "variant,model,class"
        if (compare.SUBNETS_DIR / "manifest.json").exists()
        else ("variant,model")
    )
    out = tmp_path / "cmp"
    status = sim_main(
        [
            "compare",
            "--approaches", approaches,
            "--sizes", "variant=2;model=2;class=2",
            "--images", "12",
            "--crash-images", "4",
            "--throughput-images", "8",
            "--concurrency", "2",
            "--deadline-ms", "1500",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Variant, model and class")
    assert (out / "crash.png").exists() and (out / "costs.png").exists()
    rows = report["results"]
    swarms = {r["swarm"] for r in rows}
    assert len(swarms) == len(approaches.split(","))
    for swarm in swarms:
        phases = [r["phase"] for r in rows if r["swarm"] == swarm]
        assert phases == ["healthy", "concurrency 2", "1 crashed", "2 crashed"]
    healthy = {r["approach"]: r for r in rows if r["phase"] == "healthy"}
    for row in healthy.values():
        assert row["images"] == 12 and row["answered"] == 1.0
        assert row["accuracy"] > 0.6 and row["bytes_per_image"] > 784
    # Activations cross the wire in model parallelism: more bytes than the image alone.
    assert healthy["model"]["bytes_per_image"] > 10_000
    for row in rows:
        if row["approach"] == "model" and row["crashed"]:
            # A crashed stage: no answer at all, each call bounded by its deadline.
            assert row["answered"] == 0.0 and row["answerable"] == []
            assert row["max_ms"] < 1500
        if row["approach"] == "variant" and row["crashed"] == 1:
            assert row["answered"] == 1.0 and len(row["answerable"]) == 10
        if row["approach"] == "class" and row["crashed"] == 1:
            assert row["answered"] == 1.0 and len(row["answerable"]) == 5
    assert_nothing_left(out)


def test_compare_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        sim_main(["compare", "--approaches", "telepathy"])
    assert "--approaches: unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sim_main(["compare", "--sizes", "model=two"])
    assert "not a list of ints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sim_main(["compare", "--images", "0"])
    assert "--images must be at least 1" in capsys.readouterr().err
