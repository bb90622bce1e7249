"""Tests of swarm.inference: manifest, engine (checks, batching, failures), input decoding."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from PIL import Image

from swarm import config
from swarm.config import Timings
from swarm.errors import ConfigError, DecodeError, InferenceError, MessageTooLargeError
from swarm.inference import (
    Engine,
    Manifest,
    ModelSpec,
    decode_image,
    default_manifest_path,
    load_image_file,
    load_manifest,
    top_k,
)
from swarm.metrics import Metrics
from tests.swarm.conftest import build_tiny_model, model_entry, write_manifest

RNG = np.random.default_rng(7)


def sample(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 28, 28), dtype=np.float32)


def reference_probs(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(spec.file), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": x[np.newaxis]})
    return np.asarray(out[0])


@pytest.fixture
async def engine(tiny_manifest: Manifest) -> AsyncIterator[Engine]:
    async with Engine(tiny_manifest.get("T1")) as eng:
        yield eng


# --- manifest ---------------------------------------------------------------------------


def test_manifest_loads_specs_with_absolute_paths(tiny_model_dir: Path) -> None:
    """A valid manifest yields every model, its fields, and an absolute file path."""
    manifest = load_manifest(tiny_model_dir / "manifest.json")
    assert [m.name for m in manifest.models] == ["T1", "T2", "T3"]
    spec = manifest.get("T2")
    assert spec.file == (tiny_model_dir / "models" / "t2.onnx").resolve()
    assert spec.file.is_absolute()
    assert spec.role == "variant"
    assert spec.macs == 7840
    assert spec.val_accuracy == pytest.approx(0.82)
    assert len(manifest.class_names) == 10
    assert manifest.variants == manifest.models


def test_manifest_get_unknown_lists_known_names(tiny_manifest: Manifest) -> None:
    """Asking for an unknown model names the models that exist."""
    with pytest.raises(ConfigError, match=r"'V9'.*T1, T2, T3"):
        tiny_manifest.get("V9")


def test_missing_manifest_says_what_to_do(tmp_path: Path) -> None:
    """A missing manifest is a ConfigError naming the path and how to produce one."""
    with pytest.raises(ConfigError, match=r"not found.*MANIFEST\.md"):
        load_manifest(tmp_path / "nope.json")


def test_default_manifest_path_is_in_variants() -> None:
    """Without a path, the manifest is looked up in the variants package."""
    path = default_manifest_path()
    assert path.name == "manifest.json"
    assert path.parent.name == "variants"


def test_unparseable_manifest_is_config_error(tmp_path: Path) -> None:
    """A manifest that is not JSON is a ConfigError, not a JSONDecodeError."""
    (tmp_path / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot read"):
        load_manifest(tmp_path / "manifest.json")


def _entry(**overrides: Any) -> dict[str, Any]:
    return model_entry("V1", "models/v1.onnx", b"x", **overrides)


@pytest.mark.parametrize(
    ("models", "top", "match"),
    [
        ([_entry()], {"schema": 2}, "schema"),
        ([_entry()], {"class_names": ["a", "b"]}, "class_names"),
        ([_entry()], {"input": {"name": "x", "shape": [None, 1, 28, 28]}}, "input"),
        ([_entry()], {"output": {"shape": [None, 5]}}, "output"),
        ([_entry()], {"input": 5}, "malformed"),
        ([], {}, "non-empty"),
        ([_entry(), _entry()], {}, "unique"),
        ([_entry(role="boss")], {}, "role"),
        ([_entry(sha256="abc")], {}, "sha256"),
        ([_entry(macs=True)], {}, "macs"),
        ([_entry(params=-1)], {}, "params"),
        ([_entry(val_accuracy="high")], {}, "val_accuracy"),
        ([_entry(latency_ms=None)], {}, "latency_ms"),
        ([{k: v for k, v in _entry().items() if k != "file"}], {}, "file"),
        (["V1"], {}, "object"),
    ],
)
def test_malformed_manifest_is_config_error(
    tmp_path: Path, models: list[Any], top: dict[str, Any], match: str
) -> None:
    """Each kind of malformed manifest is a ConfigError that points at the problem."""
    path = write_manifest(tmp_path, models, **top)
    with pytest.raises(ConfigError, match=match):
        load_manifest(path)


def test_manifest_top_level_must_be_object(tmp_path: Path) -> None:
    """A JSON array at the top level is rejected with a ConfigError."""
    (tmp_path / "manifest.json").write_text(json.dumps([1]), encoding="utf-8")
    with pytest.raises(ConfigError, match="object"):
        load_manifest(tmp_path / "manifest.json")


# --- engine: loading and checks ---------------------------------------------------------


async def test_engine_matches_onnxruntime(engine: Engine) -> None:
    """infer returns the model's own (10,) probabilities and the measured time."""
    x = sample(1)
    result = await engine.infer(x)
    assert result.probs.shape == (10,)
    assert result.probs.dtype == np.float32
    np.testing.assert_allclose(result.probs, reference_probs(engine.spec, x), rtol=1e-5)
    assert result.probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert result.seconds > 0
    assert result.batch_size == 1


async def test_sha256_mismatch_refuses_to_load(tiny_manifest: Manifest) -> None:
    """A model file whose hash differs from the manifest is refused with InferenceError."""
    spec = dataclasses.replace(tiny_manifest.get("T1"), sha256="0" * 64)
    with pytest.raises(InferenceError, match="sha256"):
        async with Engine(spec):
            pass


async def test_missing_model_file(tiny_manifest: Manifest, tmp_path: Path) -> None:
    """A manifest entry whose file is missing fails with InferenceError naming it."""
    spec = dataclasses.replace(tiny_manifest.get("T1"), file=tmp_path / "gone.onnx")
    with pytest.raises(InferenceError, match=r"gone\.onnx"):
        await Engine(spec).start()


async def test_not_an_onnx_file(tmp_path: Path, tiny_manifest: Manifest) -> None:
    """Bytes that are not ONNX (with a matching hash) give InferenceError, not an ORT error."""
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"definitely not a protobuf")
    entry = model_entry("J", "junk.onnx", path.read_bytes())
    spec = dataclasses.replace(tiny_manifest.get("T1"), file=path, sha256=entry["sha256"])
    with pytest.raises(InferenceError, match="cannot load"):
        await Engine(spec).start()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_name": "image"},
        {"input_shape": (1, 1, 28, 28)},
        {"input_shape": ("N", 3, 28, 28)},
        {"elem_type": TensorProto.DOUBLE},
        {"classes": 5},
    ],
    ids=["input-name", "fixed-batch", "channels", "double", "classes"],
)
async def test_interface_check(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    """A model without the shipped interface is refused and the message shows both sides."""
    data = build_tiny_model(**kwargs)
    (tmp_path / "m.onnx").write_bytes(data)
    manifest = load_manifest(write_manifest(tmp_path, [model_entry("M", "m.onnx", data)]))
    with pytest.raises(InferenceError, match=r"interface is .*expected"):
        await Engine(manifest.get("M")).start()


async def test_bad_arguments(tiny_manifest: Manifest, engine: Engine) -> None:
    """Bad thread counts and non-canonical inputs are refused clearly."""
    with pytest.raises(ConfigError, match="threads"):
        Engine(tiny_manifest.get("T1"), threads=0)
    with pytest.raises(InferenceError, match="shape"):
        await engine.infer(np.zeros((28, 28), dtype=np.float32))
    with pytest.raises(InferenceError, match="float32"):
        await engine.infer(np.zeros((1, 28, 28), dtype=np.float64))


async def test_inference_runs_in_one_dedicated_thread(
    tiny_manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every batch runs off the event loop, in the same single engine thread."""
    real_run = ort.InferenceSession.run
    threads: set[str] = set()

    def spy_run(self: ort.InferenceSession, *args: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", spy_run)
    async with Engine(tiny_manifest.get("T1"), timings=Timings(max_batch=2)) as eng:
        for _ in range(3):
            await asyncio.gather(*(eng.infer(sample(i)) for i in range(5)))
    assert len(threads) == 1
    assert threads != {threading.current_thread().name}
    assert threads.pop().startswith("vswarm-infer-T1")


# --- engine: batching -------------------------------------------------------------------


async def test_concurrent_calls_run_as_one_batch(tiny_manifest: Manifest) -> None:
    """Concurrent calls are gathered into one batch, each caller getting its own answer."""
    spec = tiny_manifest.get("T1")
    metrics = Metrics()
    timings = Timings(max_batch=8, batch_wait_s=5.0)  # full batch closes the wait early
    xs = [sample(i) for i in range(8)]
    async with Engine(spec, timings=timings, metrics=metrics) as eng:
        results = await asyncio.gather(*(eng.infer(x) for x in xs))
    assert [r.batch_size for r in results] == [8] * 8
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_allclose(r.probs, reference_probs(spec, x), rtol=1e-5)
    assert len({id(r.probs) for r in results}) == 8
    assert metrics.registry.get_sample_value("vswarm_batch_size_count") == 1
    assert metrics.registry.get_sample_value("vswarm_batch_size_sum") == 8


async def test_batches_are_bounded_by_max_batch(tiny_manifest: Manifest) -> None:
    """Ten concurrent calls with max_batch 4 run as batches of 4, 4 and 2."""
    timings = Timings(max_batch=4, batch_wait_s=0.0)
    async with Engine(tiny_manifest.get("T1"), timings=timings) as eng:
        results = await asyncio.gather(*(eng.infer(sample(i)) for i in range(10)))
    assert Counter(r.batch_size for r in results) == {4: 8, 2: 2}


async def test_batching_off_runs_one_by_one(tiny_manifest: Manifest) -> None:
    """With batching off every call runs alone and still gets the right answer."""
    spec = tiny_manifest.get("T2")
    async with Engine(spec, batching=False) as eng:
        results = await asyncio.gather(*(eng.infer(sample(i)) for i in range(5)))
    assert [r.batch_size for r in results] == [1] * 5
    np.testing.assert_allclose(results[3].probs, reference_probs(spec, sample(3)), rtol=1e-5)


@pytest.mark.parametrize("batching", [True, False])
async def test_failing_batch_fails_only_its_callers(
    tiny_manifest: Manifest, monkeypatch: pytest.MonkeyPatch, batching: bool
) -> None:
    """An ORT failure fails that batch's callers with InferenceError; the engine serves on."""
    real_run = ort.InferenceSession.run
    calls = {"n": 0}

    def flaky_run(self: ort.InferenceSession, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ort_state.Fail("injected failure")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", flaky_run)
    timings = Timings(max_batch=3, batch_wait_s=5.0)
    async with Engine(tiny_manifest.get("T1"), timings=timings, batching=batching) as eng:
        first = await asyncio.gather(
            *(eng.infer(sample(i)) for i in range(3)), return_exceptions=True
        )
        failed = [r for r in first if isinstance(r, InferenceError)]
        assert len(failed) == (3 if batching else 1)
        assert "injected failure" in str(failed[0])
        assert len({id(e) for e in failed}) == len(failed)
        again = await asyncio.gather(*(eng.infer(sample(i)) for i in range(3)))
    assert [r.probs.shape for r in again] == [(10,)] * 3


async def test_non_finite_row_fails_only_that_caller(tiny_manifest: Manifest) -> None:
    """An input that drives the model to NaN fails alone; its batch-mates get answers."""
    timings = Timings(max_batch=2, batch_wait_s=5.0)
    bad = np.full((1, 28, 28), np.inf, dtype=np.float32)
    async with Engine(tiny_manifest.get("T1"), timings=timings) as eng:
        results = await asyncio.gather(eng.infer(bad), eng.infer(sample()), return_exceptions=True)
    assert isinstance(results[0], InferenceError)
    assert "non-finite" in str(results[0])
    assert not isinstance(results[1], BaseException)
    assert results[1].batch_size == 2


async def test_cancelled_caller_does_not_disturb_others(tiny_manifest: Manifest) -> None:
    """A caller that gives up is skipped; the others in its batch are answered."""
    timings = Timings(max_batch=3, batch_wait_s=5.0)
    async with Engine(tiny_manifest.get("T1"), timings=timings) as eng:
        tasks = [asyncio.create_task(eng.infer(sample(i))) for i in range(3)]
        await asyncio.sleep(0)  # one loop turn: every task has queued its input
        tasks[0].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    assert [r.batch_size for r in done[1:] if not isinstance(r, BaseException)] == [2, 2]


async def test_close_fails_queued_calls_and_is_idempotent(tiny_manifest: Manifest) -> None:
    """Closing fails waiting callers with InferenceError (no hang); closing twice is fine."""
    eng = Engine(tiny_manifest.get("T1"), timings=Timings(max_batch=32, batch_wait_s=60.0))
    await eng.start()
    tasks = [asyncio.create_task(eng.infer(sample(i))) for i in range(3)]
    await asyncio.sleep(0)  # one loop turn: every task has queued its input
    await eng.aclose()
    await eng.aclose()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        assert isinstance(outcome, InferenceError)
    with pytest.raises(InferenceError, match="not running"):
        await eng.infer(sample())
    with pytest.raises(InferenceError, match="closed"):
        await eng.start()
    assert "closed" in repr(eng)


def test_top_k_orders_and_breaks_ties_low() -> None:
    """top_k returns the k best classes by probability, ties to the lower index."""
    probs = np.array([0.1, 0.3, 0.3, 0.05, 0.25, 0, 0, 0, 0, 0], dtype=np.float32)
    assert [c for c, _ in top_k(probs, 3)] == [1, 2, 4]
    assert top_k(probs, 1)[0][1] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="k must be"):
        top_k(probs, 0)


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
