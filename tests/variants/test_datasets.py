"""Datasets: image folders (layouts, odd images, bad folders), digits, stratified splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.variants.imagefolder import class_image, truncated_png, write_rgb_folder
from variants import datasets
from variants.datasets import DatasetError
from variants.datasets import decode as dec


def test_rgb_folder_loads_with_odd_images_converted_and_bad_ones_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CMYK and palette images are converted, a corrupt file is skipped with a count and a
    warning, a text file is ignored; channels and size come from the images."""
    root = write_rgb_folder(tmp_path / "shapes")
    splits = datasets.load(str(root), tmp_path / "cache")
    assert splits.class_names == ("class_0", "class_1", "class_2")
    assert splits.input.channels == 3 and splits.input.size == 30  # median shorter side
    total = len(splits.train) + len(splits.val) + len(splits.test)
    assert total == 3 * 12 + 2  # the CMYK and palette images count, the corrupt one not
    assert splits.notes["skipped_images"] == 1
    err = capsys.readouterr().err
    assert "skipped 1 image" in err and "corrupt.png" in err
    assert "data.ignored_files" in err
    for part in (splits.train, splits.val, splits.test):
        assert set(np.unique(part.labels)) == {0, 1, 2}  # stratified
        x = part.as_float()
        assert x.shape[1:] == (3, 30, 30) and x.min() >= 0.0 and x.max() <= 1.0
    assert len(splits.mean) == 3 and all(s > 0 for s in splits.std)


def test_folder_splits_are_fixed_and_the_cache_is_reused(tmp_path: Path) -> None:
    """Loading twice gives the same split; the second load reads the decode cache."""
    root = write_rgb_folder(tmp_path / "shapes")
    first = datasets.load(str(root), tmp_path / "cache", channels=1, size=16)
    files = sorted((tmp_path / "cache").iterdir())
    second = datasets.load(str(root), tmp_path / "cache", channels=1, size=16)
    assert sorted((tmp_path / "cache").iterdir()) == files
    assert first.input.shape == (1, 16, 16)
    assert np.array_equal(np.asarray(first.test.images[:]), np.asarray(second.test.images[:]))
    assert np.array_equal(first.test.labels, second.test.labels)


def test_given_train_and_test_folders_are_kept(tmp_path: Path) -> None:
    """train/ and test/ are used as given; validation is carved out of train/."""
    for split, n in (("train", 10), ("test", 3)):
        for c in range(2):
            folder = tmp_path / "d" / split / f"k{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                class_image(c, 10 * c + i + (500 if split == "test" else 0)).save(
                    folder / f"{i}.png"
                )
    splits = datasets.load(str(tmp_path / "d"), tmp_path / "cache", size=12)
    assert len(splits.test) == 6
    assert len(splits.train) + len(splits.val) == 20
    assert splits.class_names == ("k0", "k1")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda r: (r / "only").mkdir(parents=True), "one class"),
        (lambda r: r.mkdir(), "no class subfolders"),
        (lambda r: [(r / n).mkdir(parents=True) for n in ("Cat", "cat")], "differ only by case"),
        (lambda r: [(r / n).mkdir(parents=True) for n in ("a", "b\tc")], "cannot be a label"),
        (lambda r: [(r / n).mkdir(parents=True) for n in ("a", " b")], "whitespace"),
        (lambda r: [(r / n).mkdir(parents=True) for n in ("a", "b" * 101)], "longer than"),
        (lambda r: [(r / f"c{i}").mkdir(parents=True) for i in range(1001)], "at most 1000"),
    ],
)
def test_bad_folders_say_what_is_wrong(tmp_path: Path, make: object, match: str) -> None:
    """A folder with one class, no classes, clashing or unusable names, or too many
    classes is refused with an error naming the problem."""
    root = tmp_path / "data"
    make(root)  # type: ignore[operator]
    with pytest.raises(DatasetError, match=match):
        datasets.load(str(root), tmp_path / "cache")


def test_an_empty_class_is_named(tmp_path: Path) -> None:
    """A class folder without images is an error that names the folder."""
    root = tmp_path / "data"
    (root / "full").mkdir(parents=True)
    class_image(0, 1).save(root / "full" / "a.png")
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"empty.*holds no images"):
        datasets.load(str(root), tmp_path / "cache")


def test_a_class_with_too_few_images_for_three_splits(tmp_path: Path) -> None:
    """A class of two images cannot give train, validation and test: said, not crashed."""
    root = tmp_path / "data"
    for c, n in ((0, 10), (1, 2)):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(n):
            class_image(c, i).save(root / f"k{c}" / f"{i}.png")
    with pytest.raises(DatasetError, match="at least 3 images"):
        datasets.load(str(root), tmp_path / "cache")


def test_unknown_data_names_the_choices(tmp_path: Path) -> None:
    """--data that is neither a named dataset nor a folder lists what it could be."""
    with pytest.raises(DatasetError, match="digits"):
        datasets.load(str(tmp_path / "missing"))


def test_sixteen_bit_and_exif_rotated_images_decode(tmp_path: Path) -> None:
    """A 16-bit grayscale PNG is scaled (not clipped) to 8 bits; an EXIF orientation is
    applied before cropping; a truncated file raises BadImage."""
    deep = Image.fromarray(np.full((8, 12), 50_000, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    deep.save(tmp_path / "deep.png")
    out = dec.decode(tmp_path / "deep.png", 1, 8)
    assert out.shape == (1, 8, 8)
    assert np.all(np.abs(out.astype(int) - 195) <= 1)  # 50000 / 257, not clipped to 255

    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # white on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    upright = dec.open_flat(tmp_path / "rot.jpg")
    assert upright.size == (10, 20)
    arr = np.asarray(upright.convert("L"), dtype=np.int64)
    assert arr[:10].mean() > 200 and arr[10:].mean() < 60  # the white half is now on top

    (tmp_path / "cut.png").write_bytes(truncated_png())
    with pytest.raises(dec.BadImage):
        dec.decode(tmp_path / "cut.png", 3, 8)


def test_digits_are_split_stratified_and_held_out() -> None:
    """Digits: 1,797 8x8 images, ten classes, disjoint fixed splits, no mirroring."""
    a, b = datasets.load("digits"), datasets.load("digits")
    assert a.input.shape == (1, 8, 8) and a.num_classes == 10 and not a.hflip
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert np.array_equal(a.test.images, b.test.images)
    for part in (a.val, a.test):
        assert set(np.unique(part.labels)) == set(range(10))
    train_rows = {
        r.tobytes() + bytes([lbl]) for r, lbl in zip(a.train.images, a.train.labels, strict=True)
    }
    # digits has a few duplicate images; the split is by index, so count exact overlaps only
    overlap = sum(
        r.tobytes() + bytes([lbl]) in train_rows
        for r, lbl in zip(a.test.images, a.test.labels, strict=True)
    )
    assert overlap < 0.02 * len(a.test)


def test_a_given_split_without_images_is_refused(tmp_path: Path) -> None:
    """An empty test/ beside train/ is an error naming it, not an empty evaluation."""
    for c in range(2):
        folder = tmp_path / "d" / "train" / f"k{c}"
        folder.mkdir(parents=True)
        for i in range(5):
            class_image(c, 10 * c + i).save(folder / f"{i}.png")
        (tmp_path / "d" / "test" / f"k{c}").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"test holds no decodable image"):
        datasets.load(str(tmp_path / "d"), tmp_path / "cache", size=8)


def test_decoding_in_worker_processes_gives_the_same_cache(tmp_path: Path) -> None:
    """Two decode processes produce the same images, labels and skips as one."""
    root = write_rgb_folder(tmp_path / "shapes")
    one = datasets.load(str(root), tmp_path / "c1", channels=3, size=10)
    two = datasets.load(str(root), tmp_path / "c2", channels=3, size=10, workers=2)
    for a, b in ((one.train, two.train), (one.val, two.val), (one.test, two.test)):
        assert np.array_equal(np.asarray(a.images[:]), np.asarray(b.images[:]))
        assert np.array_equal(a.labels, b.labels)
    assert one.notes["skipped_images"] == two.notes["skipped_images"] == 1
