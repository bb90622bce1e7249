"""Tests of swarm.inference.imaging: decoding untrusted images into a family's input."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from swarm import config
from swarm.errors import ConfigError, DecodeError, MessageTooLargeError
from swarm.inference.imaging import decode_image, decode_image_async, load_image_file

RNG = np.random.default_rng(7)


# --- decoding ---------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


GREY = RNG.integers(0, 256, size=(28, 28), dtype=np.uint8)


def test_png_28x28_greyscale_is_exact() -> None:
    """A 28x28 greyscale PNG decodes to exactly its pixels, shape (1, 28, 28)."""
    x = decode_image(encode(Image.fromarray(GREY, "L"), "PNG"))
    assert x.shape == (1, 28, 28)
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x[0], GREY)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("size", [(28, 28), (56, 40), (10, 7)])
def test_png_modes_and_sizes(mode: str, size: tuple[int, int]) -> None:
    """PNGs of any common mode and size become (1, 28, 28) uint8 pixels."""
    img = Image.fromarray(GREY, "L").resize(size).convert(mode)
    if mode == "P":
        img.info["transparency"] = 0
    x = decode_image(encode(img, "PNG"))
    assert x.shape == (1, 28, 28)
    assert x.dtype == np.uint8


def test_uniform_image_resizes_to_its_grey_value() -> None:
    """Resizing keeps a uniform colour's greyscale value (antialiasing adds no ringing)."""
    img = Image.new("RGB", (300, 200), (200, 100, 50))
    grey = np.asarray(Image.new("RGB", (1, 1), (200, 100, 50)).convert("L"))[0, 0]
    x = decode_image(encode(img, "PNG"))
    assert np.abs(x.astype(int) - int(grey)).max() <= 1


@pytest.mark.parametrize("size", [(28, 28), (280, 280)])
def test_jpeg_decodes_close_to_source(size: tuple[int, int]) -> None:
    """A JPEG decodes (downscaled if needed) close to its greyscale source."""
    smooth = np.tile(np.linspace(0, 255, 28, dtype=np.uint8), (28, 1))
    img = Image.fromarray(smooth, "L").resize(size).convert("RGB")
    x = decode_image(encode(img, "JPEG", quality=95))
    assert x.shape == (1, 28, 28)
    assert np.abs(x[0].astype(float) - smooth).mean() < 0.03 * 255


@pytest.mark.parametrize("shape", [(28, 28), (1, 28, 28), (1, 1, 28, 28)])
@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32", "float64", ">f4"])
def test_npy_accepted_shapes_and_dtypes(shape: tuple[int, ...], dtype: str) -> None:
    """.npy of every accepted shape; uint8 kept, floats in [0, 1] rounded to pixels."""
    array = GREY.reshape(shape) if dtype == "uint8" else (GREY / 255.0).astype(dtype).reshape(shape)
    x = decode_image(npy(array))
    assert x.shape == (1, 28, 28)
    assert x.dtype == np.uint8
    assert x.flags.c_contiguous
    np.testing.assert_array_equal(x[0], GREY)


def test_npy_fortran_order() -> None:
    """A Fortran-ordered .npy decodes to the same values."""
    array = np.asfortranarray(GREY)
    np.testing.assert_array_equal(decode_image(npy(array))[0], GREY)


def _npy_v3() -> bytes:
    data = bytearray(npy(GREY))
    data[6] = 3
    return bytes(data)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (npy(np.zeros((28, 27), np.uint8)), r"expected shape"),
        (npy(np.zeros((2, 1, 28, 28), np.uint8)), r"expected shape"),
        (npy(np.zeros((28, 28), np.int64)), r"int64"),
        (npy(np.zeros((28, 28), bool)), r"bool"),
        (npy(np.zeros((28, 28), [("a", "f4")])), r"expected shape"),
        (npy(np.full((28, 28), 1.5, np.float32)), r"\[0, 1\]"),
        (npy(np.full((28, 28), -0.1, np.float32)), r"\[0, 1\]"),
        (npy(np.full((28, 28), np.nan, np.float32)), r"finite"),
        (npy(GREY)[:-10], r"cannot read"),
        (npy(GREY)[:9], r"cannot read"),
        (_npy_v3(), r"version"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': 'O'}   \n", r"cannot read|expected"),
        (encode(Image.fromarray(GREY), "PNG")[:60], r"PNG"),
        (encode(Image.fromarray(GREY), "JPEG")[:40], r"JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, r"PNG"),
        (b"", r"unsupported"),
        (b"GIF89a" + b"\x00" * 20, r"GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", r"WEBP"),
        (b"BM" + b"\x00" * 30, r"BMP"),
        (b"hello", r"unsupported"),
    ],
)
def test_malformed_inputs_are_decode_errors(body: bytes, match: str) -> None:
    """Every malformed or unsupported input is a DecodeError with a clear message."""
    with pytest.raises(DecodeError, match=match):
        decode_image(body)


def test_unsupported_message_names_file_and_type() -> None:
    """The unsupported-format message repeats the given file name and content type."""
    with pytest.raises(DecodeError, match=r"file 'a\.tif'.*type 'image/tiff'"):
        decode_image(b"II*\x00", filename="a.tif", content_type="image/tiff")


def test_format_is_told_by_content_not_name() -> None:
    """A PNG named .npy is still decoded as a PNG."""
    body = encode(Image.fromarray(GREY, "L"), "PNG")
    assert decode_image(body, filename="x.npy", content_type="application/octet-stream").shape == (
        1,
        28,
        28,
    )


def test_body_over_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body over MAX_CLASSIFY_BODY is refused with MessageTooLargeError before decoding."""
    monkeypatch.setattr(config, "MAX_CLASSIFY_BODY", 100)
    with pytest.raises(MessageTooLargeError, match="limit is 100"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)


def test_decompression_bomb_is_refused() -> None:
    """A small PNG declaring more than MAX_IMAGE_PIXELS is refused without decoding it."""
    side = int(config.MAX_IMAGE_PIXELS**0.5) + 1
    body = encode(Image.new("1", (side, side)), "PNG", optimize=True)
    assert len(body) < config.MAX_CLASSIFY_BODY
    with pytest.raises(MessageTooLargeError, match="pixels"):
        decode_image(body)


def test_pixel_limit_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pixel limits (JPEG's own, larger) follow config at call time."""
    monkeypatch.setattr(config, "MAX_JPEG_PIXELS", 28 * 28)
    with pytest.raises(MessageTooLargeError):
        decode_image(encode(Image.new("L", (29, 28)), "JPEG"))


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


VALID = [
    encode(Image.fromarray(GREY, "L"), "PNG"),
    encode(Image.fromarray(GREY, "L"), "WEBP"),
    encode(Image.fromarray(GREY, "L"), "BMP"),
    encode(Image.fromarray(GREY, "L"), "GIF"),
    encode(Image.fromarray(GREY, "L").convert("RGB").resize((40, 30)), "JPEG"),
    npy(GREY),
    npy((GREY / 255.0).astype(np.float32)),
]
MAGICS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"\x93NUMPY\x01\x00",
    b"\x93NUMPY\x02\x00",
    b"GIF89a",
    b"BM",
    b"RIFF\x00\x10\x00\x00WEBP",
]


def _check_only_decode_errors(body: bytes) -> None:
    try:
        x = decode_image(body)
    except (DecodeError, MessageTooLargeError):
        return
    assert x.shape == (1, 28, 28)
    assert x.dtype == np.uint8


FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(body: bytes) -> None:
    """Arbitrary bytes never raise anything but DecodeError or MessageTooLargeError."""
    _check_only_decode_errors(body)


@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
def test_fuzz_after_magic(magic: bytes, rest: bytes) -> None:
    """Bytes behind a valid magic number reach the decoders and still only raise DecodeError."""
    _check_only_decode_errors(magic + rest)


@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(1, 10_000),
)
def test_fuzz_mutated_valid_files(base: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    """Valid files with bytes changed or cut off only ever decode or raise DecodeError."""
    _check_only_decode_errors(_mutate(base, edits))
    _check_only_decode_errors(_mutate(base, edits)[:cut])


def test_load_image_file(tmp_path: Path) -> None:
    """load_image_file reads PNG/.npy files and gives clear errors for bad paths."""
    (tmp_path / "a.png").write_bytes(encode(Image.fromarray(GREY, "L"), "PNG"))
    (tmp_path / "b.npy").write_bytes(npy(GREY))
    (tmp_path / "c.txt").write_text("hello", encoding="utf-8")
    np.testing.assert_array_equal(load_image_file(tmp_path / "a.png")[0], GREY)
    assert load_image_file(tmp_path / "b.npy").shape == (1, 28, 28)
    with pytest.raises(ConfigError, match="does not exist"):
        load_image_file(tmp_path / "missing.png")
    with pytest.raises(ConfigError, match="not a file"):
        load_image_file(tmp_path)
    with pytest.raises(DecodeError, match=r"unsupported input \(file 'c\.txt'\)"):
        load_image_file(tmp_path / "c.txt")


def test_load_image_file_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file over the size limit is refused before it is read."""
    monkeypatch.setattr(config, "MAX_CLASSIFY_BODY", 10)
    (tmp_path / "big.npy").write_bytes(npy(GREY))
    with pytest.raises(MessageTooLargeError):
        load_image_file(tmp_path / "big.npy")


# --- formats, colour, bounds, and the event loop ------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "GIF", "JPEG"])
def test_every_format_decodes_to_the_familys_input(fmt: str) -> None:
    """PNG, WebP, BMP, GIF and JPEG all decode, to grey or to RGB as the family asks."""
    colour = RNG.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    body = encode(Image.fromarray(colour, "RGB"), fmt)
    assert decode_image(body, (1, 28, 28)).shape == (1, 28, 28)
    rgb = decode_image(body, (3, 32, 32))
    assert rgb.shape == (3, 32, 32)
    assert rgb.dtype == np.uint8


def test_gif_animation_gives_its_first_frame() -> None:
    """An animated GIF decodes to its first frame."""
    frames = [Image.new("L", (28, 28), v) for v in (10, 240)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert np.abs(decode_image(buf.getvalue()).astype(int) - 10).max() <= 2


def test_exif_rotation_is_applied() -> None:
    """A JPEG whose EXIF says 'rotated' decodes upright."""
    img = Image.new("L", (60, 30), 0)
    img.paste(255, (0, 0, 30, 30))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    x = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95), (1, 30, 60))
    # Upright, the picture is 30 wide and 60 tall: white on top.
    assert x.shape == (1, 30, 60)
    upright = decode_image(encode(img.transpose(Image.Transpose.ROTATE_270), "PNG"), (1, 30, 60))
    assert np.abs(x.astype(int) - upright.astype(int)).mean() < 20


def test_cmyk_and_16_bit_images_convert() -> None:
    """CMYK JPEGs and 16-bit grey PNGs become 8-bit pixels, not errors."""
    cmyk = Image.new("CMYK", (28, 28), (0, 0, 0, 0))
    assert decode_image(encode(cmyk, "JPEG")).max() > 200  # white
    deep = Image.fromarray(GREY.astype(np.uint16) * 257)  # mode I;16
    assert np.abs(decode_image(encode(deep, "PNG")).astype(int) - GREY).max() <= 1


@pytest.mark.parametrize(
    ("size", "error"), [((4000, 10), DecodeError), ((16_385, 600), MessageTooLargeError)]
)
def test_strips_and_oversized_sides_are_refused(
    size: tuple[int, int], error: type[Exception]
) -> None:
    """An image far longer than wide, or longer than MAX_IMAGE_SIDE on a side, is refused."""
    body = encode(Image.new("1", size), "PNG", optimize=True)
    with pytest.raises(error, match="pixels"):
        decode_image(body)


def test_a_large_photo_decodes_in_steps_quickly() -> None:
    """A 24-megapixel JPEG shrinks in the decoder: it costs milliseconds, not a second."""
    photo = Image.linear_gradient("L").resize((6000, 4000)).convert("RGB")
    body = encode(photo, "JPEG", quality=80)
    started = time.perf_counter()
    assert decode_image(body).shape == (1, 28, 28)
    assert time.perf_counter() - started < 2.0  # a loose bound: full decode takes several


async def test_decoding_off_the_loop_leaves_it_free() -> None:
    """While images decode in worker threads, the event loop keeps answering."""
    photo = Image.fromarray(RNG.integers(0, 256, size=(2000, 2000), dtype=np.uint8), "L")
    body = encode(photo, "PNG")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    try:
        await asyncio.gather(*(decode_image_async(body) for _ in range(4)))
    finally:
        ticker.cancel()
    assert ticks >= 2
