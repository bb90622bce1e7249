"""Warm start from ONNX files, the joint loss, and the joint fine-tune's CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.variants.conftest import dies_after_checkpoint, needs_torch
from variants.warmstart import PARITY_TOL

pytestmark = needs_torch

SHIPPED = Path(__file__).resolve().parents[2] / "variants" / "families" / "fashion-mnist"


def _randomize_bn(model: Any, seed: int) -> None:
    """Non-trivial BatchNorm statistics (so folding matters) and classifier weights."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(m, nn.Linear):  # confident outputs, as a trained model's
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)


def _tiny(tmp_path: Path, width: float = 0.25, res: int = 14, depth: float = 0.5) -> Any:
    import torch

    from variants.export import export_onnx
    from variants.models import Arch, MobileNetV2
    from variants.plans import Recipe

    torch.manual_seed(0)
    model = MobileNetV2(Arch(width=width, resolution=res, depth=depth))
    _randomize_bn(model, 1)
    model.eval()
    path = tmp_path / "tiny.onnx"
    export_onnx(model, path)
    return model, path, Recipe("tiny", width=width, resolution=res, depth=depth)


def test_rebuilt_model_matches_onnxruntime_and_the_original(tmp_path: Path) -> None:
    """Fused weights loaded into the architecture give onnxruntime's and the original's output."""
    import torch
    from torch import nn

    from variants import runtime
    from variants.warmstart import model_from_onnx

    original, path, recipe = _tiny(tmp_path)
    rebuilt = model_from_onnx(path, recipe, check=False)
    x = np.random.default_rng(2).random((16, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        got = torch.softmax(rebuilt(torch.from_numpy(x)), 1).numpy()
        want = torch.softmax(original(torch.from_numpy(x)), 1).numpy()
    assert np.abs(got - runtime.predict(path, x)).max() < 1e-5
    assert np.abs(got - want).max() < 1e-5
    bns = [m for m in rebuilt.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bool((b.weight == 1).all()) for b in bns)
    assert all(bool((b.running_mean == 0).all()) for b in bns)


def test_shipped_member_matches_onnxruntime() -> None:
    """A shipped member, rebuilt from its manifest entry, gives onnxruntime's probabilities."""
    from variants.warmstart import model_from_onnx, onnx_parity, read_family

    _, members = read_family(SHIPPED)
    assert members[0].name == "reference"
    v1 = next(m for m in members if m.name == "V1")
    assert (v1.recipe.width, v1.recipe.resolution, v1.recipe.depth) == (0.25, 16, 0.5)
    assert v1.recipe.distill
    model = model_from_onnx(v1.path, v1.recipe, check=False)
    assert onnx_parity(model, v1.path, n=32) < PARITY_TOL


def test_mismatched_file_gives_a_clear_error(tmp_path: Path) -> None:
    """A file that the manifest's architecture does not describe fails, naming the problem."""
    import dataclasses

    from variants.warmstart import WarmStartError, model_from_onnx, read_family

    _, path, recipe = _tiny(tmp_path)
    with pytest.raises(WarmStartError, match=r"weight shape .*fix the manifest entry"):
        model_from_onnx(path, dataclasses.replace(recipe, width=0.5))
    with pytest.raises(WarmStartError, match=r"has \d+ convolutions .* has \d+ and 1"):
        model_from_onnx(path, dataclasses.replace(recipe, depth=1.0))
    # Same layers at another resolution: only the outputs tell.
    with pytest.raises(WarmStartError, match=r"differ from onnxruntime's .*resolution"):
        model_from_onnx(path, dataclasses.replace(recipe, resolution=12))
    with pytest.raises(WarmStartError, match="missing"):
        model_from_onnx(tmp_path / "none.onnx", recipe)
    with pytest.raises(WarmStartError, match=r"manifest\.json not found"):
        read_family(tmp_path)


def test_frozen_batchnorm_survives_a_training_step(tmp_path: Path) -> None:
    """A training step moves the weights but not BatchNorm's statistics; export still agrees."""
    import torch
    from torch import nn

    from variants.export import export_onnx
    from variants.warmstart import model_from_onnx, onnx_parity, train_mode

    _, path, recipe = _tiny(tmp_path)
    model = train_mode(model_from_onnx(path, recipe))
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.classifier.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(8, 1, 28, 28)
    torch.nn.functional.cross_entropy(model(x), torch.arange(8)).backward()
    opt.step()
    after = model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["features.0.0.weight"], after["features.0.0.weight"])
    out = tmp_path / "trained.onnx"
    export_onnx(model.eval(), out)
    assert onnx_parity(model, out) < PARITY_TOL


def test_joint_loss_mixes_own_and_ensemble_losses() -> None:
    """beta=0: the members' mean own loss (KD only where a member distills); beta=1: NLL of
    the mean softmax."""
    import torch
    import torch.nn.functional as F

    from variants.joint import joint_loss, member_loss
    from variants.plans import Recipe

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, 10, generator=g) for _ in range(3)]
    teacher = torch.randn(6, 10, generator=g)
    y = torch.arange(6)
    recipes = [
        Recipe("a", 0.25, 8, distill=True),
        Recipe("b", 0.25, 8),
        Recipe("c", 0.25, 8, distill=True),
    ]
    plain_b = F.cross_entropy(logits[1], y)
    assert torch.allclose(member_loss(logits[1], y, recipes[1], teacher), plain_b)
    assert not torch.allclose(
        member_loss(logits[0], y, recipes[0], teacher), F.cross_entropy(logits[0], y)
    )
    own = sum(member_loss(z, y, r, teacher) for z, r in zip(logits, recipes, strict=True)) / 3
    assert torch.allclose(joint_loss(logits, y, recipes, teacher, 0.0), own)
    mean_p = torch.stack([F.softmax(z, 1) for z in logits]).mean(0)
    ens = F.nll_loss(mean_p.log(), y)
    assert torch.allclose(joint_loss(logits, y, recipes, teacher, 1.0), ens, atol=1e-6)
    mixed = joint_loss(logits, y, recipes, teacher, 0.3)
    assert torch.allclose(mixed, 0.7 * own + 0.3 * ens, atol=1e-6)


def _digits_family(folder: Path) -> dict[str, Any]:
    """A small untrained digits family (reference and two variants) written as a folder."""
    import torch

    from swarm.inference.manifest import file_sha256
    from variants import datasets, family
    from variants.export import export_onnx
    from variants.models import Arch, MobileNetV2
    from variants.trainer import input_format

    splits = datasets.load("digits")
    fmt = input_format(splits)
    specs = [
        ("reference", "reference", 0.35, 8, 1.0, False),
        ("V1", "w025-r6-s1", 0.25, 6, 0.5, False),
        ("V2", "w025-r8-s2-kd", 0.25, 8, 1.0, True),
    ]
    entries = []
    for i, (name, cand, w, r, d, kd) in enumerate(specs):
        torch.manual_seed(i)
        model = MobileNetV2(Arch(width=w, resolution=r, depth=d), 10, fmt)
        _randomize_bn(model, i)
        path = folder / "models" / f"{name.lower()}.onnx"
        export_onnx(model.eval(), path)
        entries.append(
            {
                "name": name,
                "role": "reference" if name == "reference" else "variant",
                "file": f"models/{path.name}",
                "sha256": file_sha256(path),
                "params": 1,
                "macs": 1,
                "resolution": r,
                "width": w,
                "depth": d,
                "val_accuracy": 0.1,
                "test_accuracy": 0.1,
                "latency_ms": 0.1,
                "recipe": {"candidate": cand, "seed": i, "distilled": kd, "weight_decay": 5e-5},
            }
        )
    manifest = {
        "schema": family.SCHEMA,
        "family": family.family_object("digits", entries),
        "dataset": splits.describe(),
        "input": family.input_object(1, 8, splits.mean, splits.std),
        "output": family.output_object(10),
        "class_names": list(splits.class_names),
        "models": entries,
    }
    family.write_manifest(folder, manifest)
    return manifest


def _events(err: str, name: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [r for r in rows if r["event"] == name]


def test_tune_cli_resumes_chooses_on_validation_and_writes_a_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after epoch 1, the run resumes at epoch 2; it keeps the best validation epoch,
    writes a family that loads and evaluates, and refuses to resume with other settings."""
    from swarm.inference.manifest import load_manifest
    from variants import evaluate, tune

    src = tmp_path / "src"
    source = _digits_family(src)
    out, run = tmp_path / "new", tmp_path / "run"
    argv = [
        "--family", str(src), "--epochs", "3", "--batch", "16", "--train-limit", "64",
        "--lr", "0.05", "--run-dir", str(run), "--out-dir", str(out), "--latency-runs", "20",
    ]  # fmt: skip
    with dies_after_checkpoint(monkeypatch):
        tune.main(argv)
    assert (run / "teacher.pt").exists() and not out.exists()
    capsys.readouterr()
    assert tune.main(argv) == 0
    err = capsys.readouterr().err
    assert [e["epoch"] for e in _events(err, "tune.resume")] == [1]
    assert [e["epoch"] for e in _events(err, "tune.epoch")] == [2, 3]

    result = json.loads((run / "result.json").read_text())
    scores = [h["val_ensemble_accuracy"] for h in result["history"]]
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2, 3]
    assert result["chosen_epoch"] == scores.index(max(scores))
    chosen = result["history"][result["chosen_epoch"]]
    manifest = json.loads((out / "manifest.json").read_text())
    variants = [m for m in manifest["models"] if m["role"] == "variant"]
    assert [m["name"] for m in variants] == ["V1", "V2"]
    assert [m["val_accuracy"] for m in variants] == chosen["val_accuracy"]
    assert abs(result["val_ensemble_accuracy_onnx"] - max(scores)) <= 0.01
    for m in variants:
        rec = m["recipe"]
        assert rec["kind"] == ("joint fine-tune" if result["chosen_epoch"] else tune.KEPT)
        assert rec["warm_started_from"]["id"] == source["family"]["id"]
        assert (rec["epochs"], rec["lr"], rec["joint_beta"]) == (3, 0.05, 0.5)
        assert rec["chosen_epoch"] == result["chosen_epoch"]
        assert 0.0 <= m["test_accuracy"] <= 1.0 and m["latency_ms"] > 0
    assert manifest["family"]["id"] != source["family"]["id"] or result["chosen_epoch"] == 0
    assert len(load_manifest(out / "manifest.json", verify=True).variants) == 2
    assert evaluate.main(["--family", str(out), "--out", str(out / "evaluation"),
                          "--runs", "10", "--no-plots"]) == 0  # fmt: skip
    assert (out / "evaluation" / "evaluation.json").exists()

    with pytest.raises(SystemExit, match="other settings"):
        tune.main([*argv, "--lr", "0.02"])


def test_tune_cli_names_a_missing_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from variants import tune

    rc = tune.main(["--family", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o")])
    assert rc == 2
    assert "manifest.json not found" in capsys.readouterr().err
