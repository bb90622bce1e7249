"""Tests of swarm.inference.imaging: decoding untrusted PNG, JPEG and .npy inputs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from swarm import config
from swarm.errors import ConfigError, DecodeError, MessageTooLargeError
from swarm.inference.imaging import decode_image, load_image_file

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
    """A 28x28 greyscale PNG decodes to exactly pixel/255 with shape (1, 28, 28)."""
    x = decode_image(encode(Image.fromarray(GREY, "L"), "PNG"))
    assert x.shape == (1, 28, 28)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[0], GREY / 255.0, rtol=1e-6)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("size", [(28, 28), (56, 40), (10, 7)])
def test_png_modes_and_sizes(mode: str, size: tuple[int, int]) -> None:
    """PNGs of any common mode and size become (1, 28, 28) floats in [0, 1]."""
    img = Image.fromarray(GREY, "L").resize(size).convert(mode)
    if mode == "P":
        img.info["transparency"] = 0
    x = decode_image(encode(img, "PNG"))
    assert x.shape == (1, 28, 28)
    assert 0.0 <= x.min() <= x.max() <= 1.0


def test_uniform_image_resizes_to_its_grey_value() -> None:
    """Resizing keeps a uniform colour's greyscale value (antialiasing adds no ringing)."""
    img = Image.new("RGB", (300, 200), (200, 100, 50))
    grey = np.asarray(Image.new("RGB", (1, 1), (200, 100, 50)).convert("L"))[0, 0]
    x = decode_image(encode(img, "PNG"))
    np.testing.assert_allclose(x, grey / 255.0, atol=1e-6)


@pytest.mark.parametrize("size", [(28, 28), (280, 280)])
def test_jpeg_decodes_close_to_source(size: tuple[int, int]) -> None:
    """A JPEG decodes (downscaled if needed) close to its greyscale source."""
    smooth = np.tile(np.linspace(0, 255, 28, dtype=np.uint8), (28, 1))
    img = Image.fromarray(smooth, "L").resize(size).convert("RGB")
    x = decode_image(encode(img, "JPEG", quality=95))
    assert x.shape == (1, 28, 28)
    assert np.abs(x[0] - smooth / 255.0).mean() < 0.03


@pytest.mark.parametrize("shape", [(28, 28), (1, 28, 28), (1, 1, 28, 28)])
@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32", "float64", ">f4"])
def test_npy_accepted_shapes_and_dtypes(shape: tuple[int, ...], dtype: str) -> None:
    """.npy of every accepted shape; uint8 is scaled by 1/255, floats in [0, 1] kept."""
    if dtype == "uint8":
        array, expected = GREY.reshape(shape), GREY / 255.0
    else:
        array = (GREY / 255.0).astype(dtype).reshape(shape)
        expected = array.astype(np.float64).reshape(28, 28)
    x = decode_image(npy(array))
    assert x.shape == (1, 28, 28)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous
    np.testing.assert_allclose(x[0], expected, rtol=1e-6, atol=1e-6)


def test_npy_fortran_order() -> None:
    """A Fortran-ordered .npy decodes to the same values."""
    array = np.asfortranarray(GREY)
    np.testing.assert_allclose(decode_image(npy(array))[0], GREY / 255.0, rtol=1e-6)


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
        (b"GIF89a" + b"\x00" * 20, r"unsupported"),
        (b"hello", r"unsupported"),
    ],
)
def test_malformed_inputs_are_decode_errors(body: bytes, match: str) -> None:
    """Every malformed or unsupported input is a DecodeError with a clear message."""
    with pytest.raises(DecodeError, match=match):
        decode_image(body)


def test_unsupported_message_names_file_and_type() -> None:
    """The unsupported-format message repeats the given file name and content type."""
    with pytest.raises(DecodeError, match=r"file 'a\.gif'.*type 'image/gif'"):
        decode_image(b"GIF89a", filename="a.gif", content_type="image/gif")


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
    """The pixel limit applies to JPEG too, and follows config.MAX_IMAGE_PIXELS."""
    monkeypatch.setattr(config, "MAX_IMAGE_PIXELS", 28 * 28)
    with pytest.raises(MessageTooLargeError):
        decode_image(encode(Image.new("L", (29, 28)), "JPEG"))


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


VALID = [
    encode(Image.fromarray(GREY, "L"), "PNG"),
    encode(Image.fromarray(GREY, "L").convert("RGB").resize((40, 30)), "JPEG"),
    npy(GREY),
    npy((GREY / 255.0).astype(np.float32)),
]
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00"]


def _check_only_decode_errors(body: bytes) -> None:
    try:
        x = decode_image(body)
    except (DecodeError, MessageTooLargeError):
        return
    assert x.shape == (1, 28, 28)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert 0.0 <= x.min() <= x.max() <= 1.0


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
    np.testing.assert_allclose(load_image_file(tmp_path / "a.png")[0], GREY / 255.0, rtol=1e-6)
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
