"""Datasets: the named ones (Fashion-MNIST, digits) and any image folder.

``load("fashion-mnist")``, ``load("digits")`` or ``load("/path/to/folder")`` gives the
``Splits`` that training, selection, export and evaluation share.
"""

from __future__ import annotations

from pathlib import Path

from variants.datasets.base import DatasetError, ImageSet, InputSpec, Splits
from variants.datasets.folder import load_folder
from variants.datasets.named import NAMED

DEFAULT = "fashion-mnist"


def load(
    data: str,
    cache_dir: Path | None = None,
    channels: int | None = None,
    size: int | None = None,
    progress: bool = False,
    workers: int = 1,
) -> Splits:
    """The dataset named ``data`` or the image folder at that path."""
    if data in NAMED:
        if channels is not None or size is not None:
            raise DatasetError(
                f"--channels and --input-size apply to image folders; {data!r} has a fixed input"
            )
        return NAMED[data]()
    path = Path(data).expanduser()
    if not path.exists():
        raise DatasetError(
            f"--data {data!r} is neither a named dataset ({', '.join(sorted(NAMED))}) nor an "
            "existing folder; give one of those names or the path of an image folder"
        )
    cache = cache_dir or Path("runs") / "cache" / path.resolve().name
    return load_folder(path, cache, channels, size, progress, workers)


def from_source(source: dict[str, object], cache_dir: Path | None = None) -> Splits:
    """The dataset a manifest's ``dataset`` object names, split exactly as at training."""
    kind = source.get("kind")
    if kind in NAMED:
        return NAMED[str(kind)]()
    if kind == "folder":
        return load(str(source["path"]), cache_dir)
    raise DatasetError(f"unknown dataset kind {kind!r} in the manifest")


__all__ = [
    "DEFAULT",
    "NAMED",
    "DatasetError",
    "ImageSet",
    "InputSpec",
    "Splits",
    "from_source",
    "load",
]
