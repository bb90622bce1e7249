"""ONNX export parity and a short training run with checkpoint and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.variants.conftest import dies_after_checkpoint, needs_torch

pytestmark = needs_torch


def test_export_matches_pytorch_within_1e4(tmp_path: Path) -> None:
    """A small member exported to ONNX gives PyTorch's probabilities within 1e-4."""
    import torch

    from variants import runtime
    from variants.export import export_onnx
    from variants.models import Arch, MobileNetV2, WithSoftmax

    torch.manual_seed(0)
    model = MobileNetV2(Arch(width=0.25, resolution=14)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    x = np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        want = WithSoftmax(model)(torch.from_numpy(x)).numpy()
    assert np.abs(runtime.predict(path, x) - want).max() <= 1e-4


def test_training_checkpoints_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed after epoch 1 resumes from its checkpoint and trains only epoch 2."""
    from variants import datasets, trainer
    from variants.plans import Recipe

    splits = datasets.load("digits")
    recipe = Recipe(
        "w025-tiny", width=0.25, resolution=6, epochs=2, batch=32, lr=0.05, train_limit=96
    )
    with dies_after_checkpoint(monkeypatch):
        trainer.train_one(recipe, tmp_path, "cpu", progress=False, splits=splits)
    assert not (tmp_path / recipe.name / "final.pt").exists()
    capsys.readouterr()
    final = trainer.train_one(recipe, tmp_path, "cpu", progress=False, splits=splits)
    events = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    resumed = [e for e in events if e["event"] == "train.resume"]
    assert len(resumed) == 1 and resumed[0]["epoch"] == 1
    assert [e["epoch"] for e in events if e["event"] == "train.epoch"] == [2]
    assert [h["epoch"] for h in final["history"]] == [1, 2]
    assert (tmp_path / recipe.name / "final.pt").exists()
    # A finished model is not trained again.
    capsys.readouterr()
    trainer.train_one(recipe, tmp_path, "cpu", progress=False, splits=splits)
    assert "train.skip_finished" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_recipe(tmp_path: Path) -> None:
    """A checkpoint made with another recipe is not silently mixed into this one."""
    from variants import datasets
    from variants.plans import Recipe
    from variants.trainer import train_one

    splits = datasets.load("digits")
    a = Recipe("m", width=0.25, resolution=6, epochs=1, batch=32, train_limit=64)
    train_one(a, tmp_path, "cpu", progress=False, splits=splits)
    (tmp_path / "m" / "final.pt").unlink()
    b = Recipe("m", width=0.25, resolution=6, epochs=1, batch=32, train_limit=64, seed=5)
    with pytest.raises(SystemExit, match="another recipe"):
        train_one(b, tmp_path, "cpu", progress=False, splits=splits)
