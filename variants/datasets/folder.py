"""An image folder as a dataset: one subfolder per class (torchvision's ImageFolder layout).

    PATH/cat/001.jpg, PATH/dog/xyz.png, ...             held-out fractions, fixed seed
    PATH/train/cat/..., PATH/val/cat/..., PATH/test/... the user's own splits (val optional)

Each split is decoded once, at the family's input size, into a uint8 cache file on disk
(``.npy``, opened as a read-only memmap), so a dataset larger than memory trains in
batches read from disk. Undecodable files are skipped with a count and a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time
import unicodedata
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from variants.datasets import decode as dec
from variants.datasets.base import (
    MAX_CLASS_NAME,
    MAX_CLASSES,
    MIN_CLASSES,
    DatasetError,
    ImageSet,
    InputSpec,
    Splits,
    channel_stats,
    stratified_split,
)

SPLIT_NAMES = ("train", "val", "test")
TEST_FRACTION = 0.15
VAL_FRACTION = 0.15
SPLIT_SEED = 20_231_119
PROBE_IMAGES = 64
DEFAULT_MAX_SIZE = 64  # default input side cap: larger inputs cost small devices dearly
DECODER_VERSION = 1  # bump when decode() changes what it produces, to renew caches


@dataclass(frozen=True)
class Listing:
    """The image files of one split and their class indices."""

    files: tuple[Path, ...]
    labels: np.ndarray
    ignored: int  # files that are not images by their suffix


def _log(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), file=sys.stderr)


def check_class_name(name: str, folder: Path) -> None:
    """A class name must be a usable label: printable, trimmed, not too long."""
    problem = ""
    if not name.strip():
        problem = "is blank"
    elif name != name.strip():
        problem = "starts or ends with whitespace"
    elif len(name) > MAX_CLASS_NAME:
        problem = f"is longer than {MAX_CLASS_NAME} characters"
    elif any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in name):
        problem = "holds control or unassigned characters"
    if problem:
        raise DatasetError(
            f"class folder {folder / name!r} cannot be a label: its name {problem}; "
            "rename the folder to a short printable class name"
        )


def class_folders(root: Path) -> list[str]:
    """The class names under ``root``, checked: 2..1000 distinct, printable, non-clashing."""
    if not root.is_dir():
        raise DatasetError(
            f"{root} is not a folder; pass --data fashion-mnist, --data digits or the path "
            "of an image folder with one subfolder per class"
        )
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DatasetError(
            f"{root} has no class subfolders; put each class's images in a subfolder named "
            "after the class (PATH/cat/1.jpg, PATH/dog/2.jpg)"
        )
    if len(names) < MIN_CLASSES:
        raise DatasetError(
            f"{root} has one class ({names[0]!r}); a classifier needs at least "
            f"{MIN_CLASSES}: add a subfolder of images for each other class"
        )
    if len(names) > MAX_CLASSES:
        raise DatasetError(
            f"{root} has {len(names)} class folders; at most {MAX_CLASSES} are supported: "
            "merge classes or split the task"
        )
    seen: dict[str, str] = {}
    for name in names:
        check_class_name(name, root)
        key = unicodedata.normalize("NFKC", name).casefold()
        if key in seen:
            raise DatasetError(
                f"class folders {seen[key]!r} and {name!r} in {root} differ only by case or "
                "Unicode form, so they would be one label twice; merge or rename them"
            )
        seen[key] = name
    return names


def list_split(root: Path, classes: Sequence[str], require_all: bool) -> Listing:
    """Every image file under root/CLASS/ (recursively, sorted), labelled by class index."""
    files: list[Path] = []
    labels: list[int] = []
    ignored = 0
    for index, name in enumerate(classes):
        folder = root / name
        found = []
        if folder.is_dir():
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    if f.startswith("."):
                        continue
                    if Path(f).suffix.lower() in dec.IMAGE_SUFFIXES:
                        found.append(Path(dirpath) / f)
                    else:
                        ignored += 1
        if not found and require_all:
            raise DatasetError(
                f"class folder {folder} holds no images (looked for "
                f"{', '.join(sorted(dec.IMAGE_SUFFIXES))}); add images or remove the folder"
            )
        files += found
        labels += [index] * len(found)
    return Listing(tuple(files), np.asarray(labels, dtype=np.int64), ignored)


def layout(root: Path) -> tuple[list[str], dict[str, Listing]]:
    """The class names and the listing of each split the user gave ('all' if none)."""
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if "train" in subdirs and subdirs <= set(SPLIT_NAMES):
        classes = class_folders(root / "train")
        listings = {"train": list_split(root / "train", classes, require_all=True)}
        for split in ("val", "test"):
            if split in subdirs:
                extra = set(class_folders(root / split)) - set(classes)
                if extra:
                    raise DatasetError(
                        f"{root / split} has class folders {sorted(extra)} that "
                        f"{root / 'train'} lacks; every class needs training images"
                    )
                listings[split] = list_split(root / split, classes, require_all=False)
        return classes, listings
    classes = class_folders(root)
    return classes, {"all": list_split(root, classes, require_all=True)}


def probe(files: Sequence[Path]) -> tuple[int, int]:
    """(channels, median shorter side) of up to PROBE_IMAGES files spread over the list."""
    step = max(1, len(files) // PROBE_IMAGES)
    gray, sides = True, []
    for path in files[::step][:PROBE_IMAGES]:
        try:
            img = dec.open_flat(path)
        except dec.BadImage:
            continue
        sides.append(min(img.size))
        gray = gray and dec.is_grayscale(img)
    if not sides:
        raise DatasetError(f"none of the {min(len(files), PROBE_IMAGES)} images probed decodes")
    return (1 if gray else 3), int(statistics.median(sides))


def _cache_key(files: Sequence[Path], spec: InputSpec) -> str:
    h = hashlib.sha256(f"vswarm-cache/{DECODER_VERSION}/{spec.channels}/{spec.size}\n".encode())
    for path in files:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _decode_one(job: tuple[Path, int, int]) -> tuple[np.ndarray | None, str]:
    """(pixels, "") or (None, why): one file, in a worker process or here."""
    path, channels, size = job
    try:
        return dec.decode(path, channels, size), ""
    except dec.BadImage as exc:
        return None, f"{path}: {exc}"


def cached_split(
    listing: Listing,
    spec: InputSpec,
    cache_dir: Path,
    split: str,
    progress: bool,
    workers: int = 1,
) -> tuple[ImageSet, list[str]]:
    """The split's images decoded into (or read back from) a uint8 cache file on disk;
    ``workers`` > 1 decodes in that many processes (the file order is kept)."""
    key = _cache_key(listing.files, spec)
    npy, meta_path = cache_dir / f"{split}-{key}.npy", cache_dir / f"{split}-{key}.json"
    if npy.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        images = np.load(npy, mmap_mode="r")[: meta["count"]]
        return ImageSet(images, np.asarray(meta["labels"], dtype=np.int64)), meta["skipped"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(max(1, len(listing.files)), *spec.shape)
    )
    labels: list[int] = []
    skipped: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(listing.files), desc=f"decode {split}", unit="img")
    jobs = [(path, spec.channels, spec.size) for path in listing.files]
    with contextlib.ExitStack() as stack:
        if workers > 1:
            # spawn: the parent may hold threads (a progress bar's) that fork would copy
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            )
            results: Iterator[tuple[np.ndarray | None, str]] = pool.map(
                _decode_one, jobs, chunksize=64
            )
        else:
            results = map(_decode_one, jobs)
        for (pixels, why), label in zip(results, listing.labels.tolist(), strict=True):
            if pixels is None:
                skipped.append(why)
            else:
                out[len(labels)] = pixels
                labels.append(label)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    out.flush()
    del out
    os.replace(tmp, npy)
    meta_path.write_text(json.dumps({"count": len(labels), "labels": labels, "skipped": skipped}))
    images = np.load(npy, mmap_mode="r")[: len(labels)]
    return ImageSet(images, np.asarray(labels, dtype=np.int64)), skipped


def load_folder(
    root: Path,
    cache_dir: Path,
    channels: int | None = None,
    size: int | None = None,
    progress: bool = True,
    workers: int = 1,
) -> Splits:
    """The image folder at ``root`` as train/val/test splits at the family's input spec."""
    root = root.expanduser().resolve()
    classes, listings = layout(root)
    every = [f for lst in listings.values() for f in lst.files]
    ignored = sum(lst.ignored for lst in listings.values())
    if ignored:
        _log("data.ignored_files", count=ignored, why="not an image by its suffix")
    if channels is None or size is None:
        found_channels, side = probe(every)
        channels = channels or found_channels
        size = size or min(max(side, 8), DEFAULT_MAX_SIZE)
    spec = InputSpec(channels=channels, size=size)
    sets: dict[str, ImageSet] = {}
    skipped_all: list[str] = []
    for split, listing in listings.items():
        sets[split], skipped = cached_split(listing, spec, cache_dir, split, progress, workers)
        skipped_all += skipped
        if not len(sets[split]):
            where = root if split == "all" else root / split
            raise DatasetError(
                f"{where} holds no decodable image ({len(skipped)} could not be decoded); "
                "add images or remove the folder"
            )
    if skipped_all:
        _log("data.skipped_images", count=len(skipped_all), first=skipped_all[:5])
        print(
            f"warning: skipped {len(skipped_all)} image(s) that could not be decoded, "
            f"e.g. {skipped_all[0]}",
            file=sys.stderr,
        )
    notes: dict[str, Any] = {"skipped_images": len(skipped_all)}
    if "all" in sets:
        full = sets.pop("all")
        rest, test = stratified_split(full.labels, TEST_FRACTION, SPLIT_SEED, "test")
        sets["test"] = _take(full, test)
        sets["train"] = _take(full, rest)
        notes["test_fraction"] = TEST_FRACTION
    if "test" not in sets:
        rest, test = stratified_split(sets["train"].labels, TEST_FRACTION, SPLIT_SEED, "test")
        sets["train"], sets["test"] = _take(sets["train"], rest), _take(sets["train"], test)
        notes["test_fraction"] = TEST_FRACTION
    if "val" not in sets:
        tr, val = stratified_split(sets["train"].labels, VAL_FRACTION, SPLIT_SEED + 1, "val")
        sets["train"], sets["val"] = _take(sets["train"], tr), _take(sets["train"], val)
        notes["val_fraction"] = VAL_FRACTION
    missing = set(range(len(classes))) - set(np.unique(sets["train"].labels).tolist())
    if missing:
        raise DatasetError(
            f"classes {[classes[i] for i in sorted(missing)]} have no decodable training "
            "image; add images or remove those folders"
        )
    mean, std = channel_stats(sets["train"].images)
    return Splits(
        name=root.name,
        source={
            "kind": "folder",
            "path": str(root),
            "split_seed": SPLIT_SEED,
            "layout": "train/val/test" if "all" not in listings else "one folder per class",
        },
        class_names=tuple(classes),
        input=spec,
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        mean=mean,
        std=std,
        hflip=True,
        notes=notes,
    )


def _take(images: ImageSet, idx: np.ndarray) -> ImageSet:
    """A subset; from a memmap, a lazily indexed view (see ``Indexed``)."""
    return ImageSet(Indexed(images.images, idx), images.labels[idx])


class Indexed:
    """Rows ``idx`` of an array, read only when sliced (keeps a memmap on disk)."""

    def __init__(self, base: Any, idx: np.ndarray) -> None:
        if isinstance(base, Indexed):
            idx, base = base.idx[idx], base.base
        self.base, self.idx = base, np.asarray(idx, dtype=np.int64)
        self.shape = (len(self.idx), *base.shape[1:])
        self.dtype = base.dtype
        self.ndim = base.ndim
        self.nbytes = int(np.prod(self.shape)) * base.dtype.itemsize

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = self.idx[key]
        if np.ndim(rows) == 0:
            return np.asarray(self.base[int(rows)])
        # Sorted reads are sequential on disk; put the rows back in the asked order.
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        out[order] = self.base[rows[order]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)


__all__ = ["Indexed", "Listing", "class_folders", "layout", "load_folder"]
