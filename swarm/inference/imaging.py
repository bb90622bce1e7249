"""Input decoding: untrusted image bytes to a family's compact input.

``decode_image`` turns untrusted bytes (PNG, JPEG, WebP, BMP, GIF's first frame, or .npy)
into the family's input: uint8 pixels, C x H x W, grey (C = 1) or RGB (C = 3).
``decode_image_async`` does it off the event loop, a bounded number at a time, so a large
or hostile image never stalls a peer; ``load_image_file`` reads one for the CLI.

Every image is bounded before its pixels are decoded: in bytes, in pixels, in each side
and in the ratio of its sides. A picture is shrunk in steps: a JPEG by its decoder's own
DCT scaling (``draft``), any other in halvings before the final antialiased resize
(``reducing_gap``), so a large photo costs milliseconds, not a second.
"""

from __future__ import annotations

import asyncio
import functools
import io
import struct
import tokenize
import warnings
import weakref
import zlib
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from swarm import config
from swarm.errors import ConfigError, DecodeError, MessageTooLargeError

FloatArray = npt.NDArray[np.float32]
PixelArray = npt.NDArray[np.uint8]
Shape = tuple[int, int, int]  # channels, height, width

# What Pillow raises on hostile or broken images: SyntaxError for malformed PNG
# chunks, struct.error / zlib.error deep in decoders, OSError for truncation.
_IMAGE_ERRORS: Final = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
# numpy parses the header with ast and tokenize: broken headers raise their errors.
_NPY_ERRORS: Final = (
    ValueError,
    TypeError,
    OSError,
    EOFError,
    SyntaxError,
    struct.error,
    tokenize.TokenError,
)

_NPY_MAGIC: Final = b"\x93NUMPY"
# Formats told by their magic bytes, never by a name or a content type.
_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
FORMATS: Final = "PNG, JPEG, WebP, BMP, GIF or .npy"
# An image's sides: each at most this long, and the long one at most this many times the
# short one; anything else is a crafted strip, not a photo.
MAX_IMAGE_SIDE: Final = 16_384
MAX_ASPECT: Final = 32
# Shrink by halvings until within this factor of the target, then resize (Pillow's
# ``reducing_gap``: 2 keeps the result as sharp as a direct antialiased resize).
_REDUCING_GAP: Final = 2.0
# Decodes at once, per process: each holds at most MAX_IMAGE_PIXELS x 4 bytes.
MAX_DECODES: Final = 2

# One bound per event loop (a semaphore belongs to the loop it first waits in).
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _format_of(body: bytes) -> str | None:
    for magic, fmt in _MAGIC:
        if body.startswith(magic):
            return fmt
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(
    body: bytes,
    shape: Shape = config.INPUT_SHAPE,
    *,
    filename: str | None = None,
    content_type: str | None = None,
) -> PixelArray:
    """Untrusted bytes -> uint8 pixels of ``shape`` (C, H, W).

    The format is told by magic bytes; ``filename`` and ``content_type`` only make
    error messages clearer. Raises DecodeError or MessageTooLargeError, nothing else.
    """
    if len(body) > config.MAX_CLASSIFY_BODY:
        raise MessageTooLargeError(
            f"input is {len(body)} bytes; the limit is {config.MAX_CLASSIFY_BODY}"
        )
    if body.startswith(_NPY_MAGIC):
        return _decode_npy(body, shape)
    fmt = _format_of(body)
    if fmt is not None:
        return _decode_picture(body, fmt, shape)
    named = ", ".join(
        f"{k} {v!r}" for k, v in (("file", filename), ("type", content_type)) if v is not None
    )
    raise DecodeError(
        f"unsupported input{f' ({named})' if named else ''}: expected a {FORMATS} file "
        "(recognised by its content, not its name)"
    )


async def decode_image_async(
    body: bytes, shape: Shape = config.INPUT_SHAPE, **names: str | None
) -> PixelArray:
    """``decode_image`` in a worker thread, ``MAX_DECODES`` at a time: the event loop
    goes on serving while an image decodes, and memory stays bounded."""
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = asyncio.Semaphore(MAX_DECODES)
    async with slots:
        # The loop's own executor: its threads end with the loop.
        return await loop.run_in_executor(
            None, functools.partial(decode_image, body, shape, **names)
        )


def _check_size(width: int, height: int, fmt: str) -> None:
    what = f"{fmt} image"
    limit = config.MAX_JPEG_PIXELS if fmt == "JPEG" else config.MAX_IMAGE_PIXELS
    if width < 1 or height < 1:
        raise DecodeError(f"{what} is {width}x{height} pixels: it has no pixels")
    if width * height > limit or max(width, height) > MAX_IMAGE_SIDE:
        raise MessageTooLargeError(
            f"{what} is {width}x{height} pixels; the limit is {limit} "
            f"pixels and {MAX_IMAGE_SIDE} on a side: send a smaller image"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise DecodeError(
            f"{what} is {width}x{height} pixels; its sides may differ at most {MAX_ASPECT}-fold"
        )


def _decode_picture(body: bytes, fmt: str, shape: Shape) -> PixelArray:
    channels, height, width = shape
    mode = "L" if channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's advisories about odd files
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body), formats=[fmt]) as img:
                _check_size(*img.size, fmt)
                if fmt == "JPEG":  # the decoder downscales by 1/2..1/8 before any pixel
                    img.draft(mode, (width, height))
                upright = ImageOps.exif_transpose(img)  # the first frame of an animation
                if upright.mode in ("P", "PA", "LA") or "transparency" in upright.info:
                    upright = upright.convert("RGBA")  # transparency must go through RGBA
                elif upright.mode in ("I;16", "I;16B", "I;16L", "I"):
                    # 16-bit grey: scale to 8 bits rather than clip.
                    wide = np.asarray(upright, dtype=np.float64)
                    upright = Image.fromarray((wide / max(wide.max(), 1) * 255).astype(np.uint8))
                converted = upright.convert(mode)  # CMYK, YCbCr, RGBA... to grey or RGB
                if converted.size != (width, height):
                    converted = converted.resize(
                        (width, height), Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP
                    )
                pixels = np.asarray(converted, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MessageTooLargeError(f"{fmt} image is too large to decode: {exc}") from exc
    except _IMAGE_ERRORS as exc:
        raise DecodeError(f"cannot decode the {fmt} image: {exc}") from exc
    if channels == 1:
        return np.ascontiguousarray(pixels.reshape(shape))
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _decode_npy(body: bytes, shape: Shape) -> PixelArray:
    channels, height, width = shape
    shapes = [(height, width), shape, (1, *shape)]
    if channels == 3:
        shapes.append((height, width, 3))
    expected = (
        f"expected shape {' or '.join(str(s) for s in shapes)}, dtype uint8 (0..255) "
        "or float (0..1)"
    )
    stream = io.BytesIO(body)
    try:
        # Read the header first: np.load would allocate whatever shape it declares.
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            npy_shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            npy_shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise DecodeError(f".npy format version {version} is not supported; use 1.0 or 2.0")
        if tuple(npy_shape) not in shapes or not (dtype == np.uint8 or dtype.kind == "f"):
            raise DecodeError(f".npy array is {dtype} {tuple(npy_shape)}; {expected}")
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except _NPY_ERRORS as exc:
        raise DecodeError(f"cannot read the .npy input: {exc}; {expected}") from exc
    if array.shape == (height, width, 3):
        array = array.transpose(2, 0, 1)
    if array.dtype != np.uint8:
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise DecodeError(
                ".npy float values must be finite and in [0, 1]; send pixel/255 or uint8"
            )
        array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(array.reshape(shape))


def load_image_file(path: Path, shape: Shape = config.INPUT_SHAPE) -> PixelArray:
    """Read an input file for the CLI; ConfigError when it cannot be read."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ConfigError(f"input {path} is not a file: pass a {FORMATS} file")
        if size > config.MAX_CLASSIFY_BODY:
            raise MessageTooLargeError(
                f"input file {path} is {size} bytes; the limit is {config.MAX_CLASSIFY_BODY}"
            )
        body = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"input file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read input file {path}: {exc}") from exc
    return decode_image(body, shape, filename=path.name)
