"""What every dataset gives training: uint8 images (N, C, S, S), labels, class names.

A dataset is split three ways: ``train`` (the models learn on it), ``val`` (selection
chooses on it) and ``test`` (held out: measured after selection, for the record only).
Images are uint8 pixels in CHW layout at the family's input size; the models divide by
255, resize and normalise inside their graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from variants.data import DatasetError

MIN_CLASSES = 2
MAX_CLASSES = 1000
MAX_CLASS_NAME = 100  # characters; a label longer than this is a path, not a class name


@dataclass(frozen=True)
class InputSpec:
    """The family's input: channels and a square side, uint8 pixels in CHW layout."""

    channels: int
    size: int

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise DatasetError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if not 4 <= self.size <= 512:
            raise DatasetError(f"input size {self.size} outside 4..512 pixels")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


@dataclass(frozen=True)
class ImageSet:
    """Images (N, C, S, S) uint8 (in memory or a read-only memmap) and labels (N,) int64."""

    images: Any  # np.ndarray or np.memmap
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DatasetError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}"
            )
        if len(self.labels) != self.images.shape[0]:
            raise DatasetError(f"{self.images.shape[0]} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def as_float(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The model input of images [start:stop]: float32 (N, C, S, S), pixel / 255."""
        return np.asarray(self.images[start:stop], dtype=np.float32) / np.float32(255.0)


@dataclass(frozen=True)
class Splits:
    """A dataset ready to train on: its three splits and what the family needs to know."""

    name: str
    source: dict[str, Any]  # how to load it again (recorded in the manifest)
    class_names: tuple[str, ...]
    input: InputSpec
    train: ImageSet
    val: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True  # a mirrored image keeps its class (not so for digits)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict[str, Any]:
        """The manifest's ``dataset`` object: how to load it again and the split sizes."""
        return {
            **self.source,
            "splits": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "held_out": "test: never trained or selected on",
            **self.notes,
        }


def channel_stats(images: Any, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of pixel / 255, streamed in chunks."""
    n, c = images.shape[0], images.shape[1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    count = 0
    for i in range(0, n, chunk):
        x = np.asarray(images[i : i + chunk], dtype=np.float64) / 255.0
        total += x.sum(axis=(0, 2, 3))
        total_sq += (x * x).sum(axis=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        raise DatasetError("no training images to compute the pixel statistics on")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-8))
    return tuple(round(float(v), 4) for v in mean), tuple(
        round(max(float(v), 1e-3), 4) for v in std
    )


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held) with ``fraction`` of each class held out, at least one each."""
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise DatasetError(
                f"class {int(c)} has {len(idx)} image(s) left for the {what} split; each class "
                "needs at least 3 images in all (train, validation, test): add images"
            )
        take = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(rng.choice(idx, size=take, replace=False))
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx
