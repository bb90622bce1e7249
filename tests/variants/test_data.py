"""Fashion-MNIST loading, its errors, and the train/validation split."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from variants import data


def test_test_split_is_the_10k_held_out_set() -> None:
    """The t10k files load as 10,000 28x28 uint8 images with labels 0..9."""
    test = data.load_split("test")
    assert test.images.shape == (10_000, 28, 28)
    assert test.images.dtype == np.uint8
    assert set(np.unique(test.labels)) == set(range(10))
    x = test.as_float()
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_missing_dataset_names_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing dataset is a clear error that names the package to install."""
    monkeypatch.setenv(data.ENV_DIR, str(tmp_path))
    with pytest.raises(data.DatasetError, match="dataset-fashion-mnist"):
        data.load_split("test")


def test_corrupt_idx_header_is_rejected(tmp_path: Path) -> None:
    """A file that is not an idx of unsigned bytes says so instead of loading garbage."""
    for name in data.FILES["test"][:2]:
        with gzip.open(tmp_path / name, "wb") as fh:
            fh.write(struct.pack(">HBB", 0, 0x0D, 3) + b"\0" * 16)
    with pytest.raises(data.DatasetError, match="not an idx file"):
        data.load_split("test", tmp_path)


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    """An idx file with fewer bytes than its header promises is an error."""
    src = data.data_dir()
    for name in data.FILES["test"][:2]:
        shutil.copy(src / name, tmp_path / name)
    img = tmp_path / data.FILES["test"][0]
    with gzip.open(img, "rb") as fh:
        raw = fh.read()
    with gzip.open(img, "wb") as fh:
        fh.write(raw[:-100])
    with pytest.raises(data.DatasetError, match="expected"):
        data.load_split("test", tmp_path)


def test_validation_split_is_fixed_stratified_and_disjoint() -> None:
    """The validation split is 500 per class, never overlaps training, and is repeatable."""
    full = data.load_split("train")
    tr, val = data.split_train_val(full)
    assert len(tr) + len(val) == 60_000 and len(val) == 5_000
    assert np.bincount(val.labels, minlength=10).tolist() == [500] * 10
    _tr2, val2 = data.split_train_val(full)
    assert np.array_equal(val.images, val2.images)
    tr_idx, val_idx = data.split_indices(full.labels)
    assert np.intersect1d(tr_idx, val_idx).size == 0
    assert np.union1d(tr_idx, val_idx).size == 60_000
