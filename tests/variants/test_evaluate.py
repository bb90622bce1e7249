"""The evaluation command on the shipped family: its three results and its files."""

from __future__ import annotations

import json
from pathlib import Path

from variants import evaluate


def test_evaluate_writes_the_papers_three_results(tmp_path: Path) -> None:
    """Per-model gains, ensembles of every subset, leave-one-out: all computed and written."""
    assert evaluate.main(["--out", str(tmp_path), "--runs", "10", "--no-plots"]) == 0
    r = json.loads((tmp_path / "evaluation.json").read_text())
    models = {m["name"]: m for m in r["models"]}
    ref = models["reference"]
    assert ref["speedup"] == 1.0 and ref["macs_gain"] == 1.0
    variants = [n for n, m in models.items() if m["role"] == "variant"]
    assert len(variants) >= 5
    for n in variants:
        assert models[n]["macs_gain"] >= 5.0
        assert models[n]["speedup"] > 1.0
    # Every non-empty subset of the variants, each with k = 1, 2, 3.
    assert len(r["subsets"]) == 2 ** len(variants) - 1
    full = next(s for s in r["subsets"] if len(s["members"]) == len(variants))
    assert full["accuracy_k2"] == r["ensemble_all"]["k2"]
    assert set(r["leave_one_out"]["k2"]) == set(variants)
    md = (tmp_path / "evaluation.md").read_text()
    assert "## 3. The whole ensemble with one variant left out" in md


def test_evaluate_reports_a_missing_manifest(tmp_path: Path) -> None:
    """A missing manifest is a clear error with exit status 2, not a traceback."""
    assert evaluate.main(["--manifest", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2


def test_evaluate_any_family_on_its_own_held_out_split(tmp_path: Path) -> None:
    """--family DIR evaluates that family on its dataset's test split (digits: 359 images,
    8x8) and the accuracies it measures are the ones its manifest recorded at export."""
    from variants import FAMILIES_DIR

    family = FAMILIES_DIR / "digits"
    out = tmp_path / "digits"
    assert evaluate.main(["--family", str(family), "--out", str(out), "--runs", "10"]) == 0
    r = json.loads((out / "evaluation.json").read_text())
    assert r["test_images"] == 359 and r["family"]["name"] == "digits"
    recorded = json.loads((family / "manifest.json").read_text())["models"]
    measured = {m["name"]: m["test_accuracy"] for m in r["models"]}
    for m in recorded:
        assert abs(measured[m["name"]] - m["test_accuracy"]) < 1e-4, m["name"]
    assert (out / "leave_one_out.png").stat().st_size > 0
