"""Input decoding: untrusted image bytes to the canonical input tensor.

``decode_image`` turns untrusted bytes (PNG, JPEG, .npy) into the canonical 1x28x28
float32 tensor in [0, 1]; ``load_image_file`` reads one from disk for the CLI.
"""

from __future__ import annotations

import io
import struct
import tokenize
import warnings
import zlib
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from swarm import config
from swarm.errors import ConfigError, DecodeError, MessageTooLargeError

FloatArray = npt.NDArray[np.float32]

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

_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC: Final = b"\xff\xd8\xff"
_NPY_MAGIC: Final = b"\x93NUMPY"
_NPY_SHAPES: Final = ((28, 28), (1, 28, 28), (1, 1, 28, 28))


def decode_image(
    body: bytes, *, filename: str | None = None, content_type: str | None = None
) -> FloatArray:
    """Untrusted bytes (PNG, JPEG or .npy) -> float32 (1, 28, 28) in [0, 1].

    The format is told by magic bytes; ``filename`` and ``content_type`` only make
    error messages clearer. Raises DecodeError or MessageTooLargeError, nothing else.
    """
    if len(body) > config.MAX_CLASSIFY_BODY:
        raise MessageTooLargeError(
            f"input is {len(body)} bytes; the limit is {config.MAX_CLASSIFY_BODY}"
        )
    if body.startswith(_NPY_MAGIC):
        return _decode_npy(body)
    if body.startswith(_PNG_MAGIC):
        return _decode_picture(body, "PNG")
    if body.startswith(_JPEG_MAGIC):
        return _decode_picture(body, "JPEG")
    named = ", ".join(
        f"{k} {v!r}" for k, v in (("file", filename), ("type", content_type)) if v is not None
    )
    raise DecodeError(
        f"unsupported input{f' ({named})' if named else ''}: expected a PNG, JPEG or .npy "
        "file (recognised by its content, not its name)"
    )


def _decode_picture(body: bytes, fmt: str) -> FloatArray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's advisories about odd files
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body), formats=[fmt]) as img:
                width, height = img.size
                if width * height > config.MAX_IMAGE_PIXELS:
                    raise MessageTooLargeError(
                        f"image is {width}x{height} pixels; the limit is "
                        f"{config.MAX_IMAGE_PIXELS} pixels"
                    )
                if fmt == "JPEG":
                    img.draft("L", (28, 28))  # let the decoder downscale by 1/2..1/8 first
                upright = ImageOps.exif_transpose(img)
                if upright.mode == "P":  # palette transparency must go through RGBA
                    upright = upright.convert("RGBA")
                grey = upright.convert("L")
                if grey.size != (28, 28):
                    grey = grey.resize((28, 28), Image.Resampling.LANCZOS)  # antialiased
                pixels = np.asarray(grey, dtype=np.float32)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MessageTooLargeError(f"{fmt} image is too large to decode: {exc}") from exc
    except _IMAGE_ERRORS as exc:
        raise DecodeError(f"cannot decode the {fmt} image: {exc}") from exc
    return (pixels / np.float32(255.0)).reshape(config.INPUT_SHAPE)


def _decode_npy(body: bytes) -> FloatArray:
    expected = (
        f"expected shape {' or '.join(str(s) for s in _NPY_SHAPES)}, dtype uint8 (0..255) "
        "or float (0..1)"
    )
    stream = io.BytesIO(body)
    try:
        # Read the header first: np.load would allocate whatever shape it declares.
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise DecodeError(f".npy format version {version} is not supported; use 1.0 or 2.0")
        if tuple(shape) not in _NPY_SHAPES or not (dtype == np.uint8 or dtype.kind == "f"):
            raise DecodeError(f".npy array is {dtype} {tuple(shape)}; {expected}")
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except _NPY_ERRORS as exc:
        raise DecodeError(f"cannot read the .npy input: {exc}; {expected}") from exc
    if array.dtype == np.uint8:
        pixels = array.astype(np.float32) / np.float32(255.0)
    else:
        # Checked before the cast: a huge float64 would overflow float32.
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise DecodeError(
                ".npy float values must be finite and in [0, 1]; send pixel/255 or uint8"
            )
        pixels = array.astype(np.float32)
    return np.ascontiguousarray(pixels.reshape(config.INPUT_SHAPE))


def load_image_file(path: Path) -> FloatArray:
    """Read an input file for the CLI; ConfigError when it cannot be read."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ConfigError(f"input {path} is not a file: pass a PNG, JPEG or .npy file")
        if size > config.MAX_CLASSIFY_BODY:
            raise MessageTooLargeError(
                f"input file {path} is {size} bytes; the limit is {config.MAX_CLASSIFY_BODY}"
            )
        body = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"input file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read input file {path}: {exc}") from exc
    return decode_image(body, filename=path.name)
