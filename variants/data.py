"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (idx format, gzip).

The 10,000-image t10k set is the held-out test set: nothing is trained or selected on it.
Training and model selection use the 60,000 training images, of which a fixed,
class-stratified validation split is held out (``split_train_val``).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
ENV_DIR = "VSWARM_FASHION_MNIST_DIR"

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
IDX_UBYTE = 0x08
VAL_SIZE = 5_000
SPLIT_SEED = 20_230_601


class DatasetError(RuntimeError):
    """The dataset is missing or its files are not what they should be."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, 28, 28)
    labels: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def as_float(self) -> np.ndarray:
        """The canonical model input: float32 (N, 1, 28, 28), pixel / 255."""
        return (self.images.astype(np.float32) / 255.0)[:, None, :, :]


def data_dir() -> Path:
    return Path(os.environ.get(ENV_DIR, str(DEFAULT_DIR)))


def _read_idx(path: Path, want_dims: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DatasetError(
            f"Fashion-MNIST file {path} is missing. Install Debian's package "
            f"'{DEBIAN_PACKAGE}' (apt-get install {DEBIAN_PACKAGE}) or point "
            f"{ENV_DIR} at a folder holding the four idx .gz files."
        ) from None
    except (OSError, EOFError) as exc:
        raise DatasetError(
            f"{path} is not a readable gzip file ({exc}); reinstall '{DEBIAN_PACKAGE}'."
        ) from exc
    if len(raw) < 4:
        raise DatasetError(f"{path} is truncated: no idx header")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != IDX_UBYTE or dims != want_dims:
        raise DatasetError(
            f"{path} is not an idx file of unsigned bytes with {want_dims} dimension(s) "
            f"(header: dtype 0x{dtype:02x}, {dims} dims)"
        )
    header = 4 + 4 * dims
    shape = struct.unpack(">" + "I" * dims, raw[4:header])
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise DatasetError(f"{path} holds {len(raw) - header} bytes of data, expected {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(name: str, directory: Path | None = None) -> Split:
    """Load ``train`` (60,000) or ``test`` (10,000, held out) images and labels."""
    if name not in FILES:
        raise ValueError(f"unknown split {name!r}; expected one of {sorted(FILES)}")
    directory = directory or data_dir()
    img_file, lbl_file, expected = FILES[name]
    images = _read_idx(directory / img_file, 3)
    labels = _read_idx(directory / lbl_file, 1).astype(np.int64)
    if images.shape != (expected, 28, 28) or labels.shape != (expected,):
        raise DatasetError(
            f"{name} split has images {images.shape} and labels {labels.shape}; "
            f"expected ({expected}, 28, 28) and ({expected},)"
        )
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetError(f"{name} labels outside 0..9 in {directory / lbl_file}")
    return Split(images=images, labels=labels)


def split_indices(
    labels: np.ndarray, val_size: int = VAL_SIZE, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a fixed, class-stratified (train, validation) split of the 60k images."""
    rng = np.random.default_rng(seed)
    per_class = val_size // 10
    val_idx = [
        rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in range(10)
    ]
    val = np.sort(np.concatenate(val_idx))
    mask = np.ones(len(labels), dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask), val


def split_train_val(
    train: Split, val_size: int = VAL_SIZE, seed: int = SPLIT_SEED
) -> tuple[Split, Split]:
    """Split the 60k training images into training and validation (``split_indices``)."""
    tr, val = split_indices(train.labels, val_size, seed)
    return (
        Split(train.images[tr], train.labels[tr]),
        Split(train.images[val], train.labels[val]),
    )
