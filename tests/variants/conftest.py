"""Fixtures for the variant family's tests."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs the train extra (PyTorch)")


class Interrupted(Exception):
    """Raised in place of a crash right after a training checkpoint was written."""


@contextlib.contextmanager
def dies_after_checkpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within the block, training dies right after writing its first ``ckpt.pt``."""
    from variants import trainer

    real_save = trainer.atomic_save

    def save_then_die(obj: object, path: Path) -> None:
        real_save(obj, path)
        if path.name == "ckpt.pt":
            raise Interrupted

    monkeypatch.setattr(trainer, "atomic_save", save_then_die)
    try:
        with pytest.raises(Interrupted):
            yield
    finally:
        monkeypatch.setattr(trainer, "atomic_save", real_save)
