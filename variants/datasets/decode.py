"""Decode one image file into the family's input: uint8 (C, S, S), whatever its kind.

Odd images are converted, not refused: EXIF rotation is applied; palette, CMYK, YCbCr and
LAB become RGB; transparency is flattened onto white; 16- and 32-bit and float pixels are
scaled to 0..255; grayscale and colour convert to the family's channels. The image is
centre-cropped to a square and resized (antialiased bilinear; JPEGs decode at a reduced
scale first). A file that cannot be decoded (truncated, corrupt, not an image, a
decompression bomb) raises ``BadImage`` for the caller to count and skip.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Errors Pillow and numpy raise on a bad file; anything else is a bug and propagates.
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
    EOFError,
    MemoryError,
)


class BadImage(Exception):
    """This file is not a decodable image; the message says why."""


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grayscale to 8 bits, scaled rather than clipped."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    else:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if lo < 0 or hi > 255:
            arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        elif img.mode == "F" and hi <= 1.0:
            arr = arr * 255.0
    arr = np.nan_to_num(arr, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _flatten(img: Image.Image) -> Image.Image:
    """Any mode to 'L' or 'RGB'; transparency composited onto white."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode in WIDE_MODES:
        img = _wide_to_l(img)
    if img.mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return img


def open_flat(path: Path, draft_size: int | None = None) -> Image.Image:
    """The image at ``path``, rotated upright, as 'L' or 'RGB'; BadImage if it cannot be."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on odd metadata are not errors
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if draft_size is not None and img.format == "JPEG":
                    img.draft("RGB" if img.mode != "L" else "L", (draft_size, draft_size))
                img.load()
                upright = ImageOps.exif_transpose(img)
                return _flatten(upright if upright is not None else img)
    except DECODE_ERRORS as exc:
        raise BadImage(f"{type(exc).__name__}: {exc}") from exc


def is_grayscale(img: Image.Image) -> bool:
    """True for an 'L' image or an RGB one whose three channels are equal everywhere."""
    if img.mode == "L":
        return True
    arr = np.asarray(img)
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


def decode(path: Path, channels: int, size: int) -> np.ndarray:
    """uint8 (channels, size, size): centre square crop, antialiased bilinear resize."""
    img = open_flat(path, draft_size=size)
    w, h = img.size
    if w < 1 or h < 1:
        raise BadImage(f"empty image ({w}x{h})")
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    try:
        img = img.resize(
            (size, size),
            Image.Resampling.BILINEAR,
            box=(left, top, left + side, top + side),
            reducing_gap=3.0,
        )
        img = img.convert("L" if channels == 1 else "RGB")
    except DECODE_ERRORS as exc:
        raise BadImage(f"{type(exc).__name__}: {exc}") from exc
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None, :, :] if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))
