"""Image folders written by the tests: small PNGs and JPEGs, odd kinds included."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40))


def class_image(cls: int, seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """An RGB image of class ``cls``: its colour on a noisy background, a bar by class."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    arr[size[1] // 4 : 3 * size[1] // 4, :, :] = COLOURS[cls % len(COLOURS)]
    return Image.fromarray(arr, "RGB")


def write_rgb_folder(root: Path, classes: int = 3, per_class: int = 12) -> Path:
    """PATH/class_k/*.png, plus a corrupt file, a CMYK JPEG and a palette PNG with
    transparency among them."""
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            class_image(c, seed=100 * c + i).save(folder / f"{i:03d}.png")
    class_image(0, 999).convert("CMYK").save(root / "class_0" / "cmyk.jpg", "JPEG")
    pal = class_image(1, 998).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(root / "class_1" / "palette.png", transparency=0)
    (root / "class_2" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "class_2" / "notes.txt").write_text("not an image")
    return root


def truncated_png() -> bytes:
    buf = io.BytesIO()
    class_image(0, 5, (64, 64)).save(buf, "PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]
