"""Tests of swarm.inference.engine: the engine (checks, batching, failures) ."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from swarm.config import Timings
from swarm.errors import ConfigError, InferenceError
from swarm.inference.engine import Engine
from swarm.inference.manifest import Manifest, ModelSpec, load_manifest
from swarm.metrics import Metrics
from tests.swarm.conftest import build_tiny_model, model_entry, write_manifest


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
    """With inline runs off, every batch runs off the event loop, in one engine thread."""
    real_run = ort.InferenceSession.run
    threads: set[str] = set()

    def spy_run(self: ort.InferenceSession, *args: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", spy_run)
    timings = Timings(max_batch=2, inline_max_s=0.0)
    async with Engine(tiny_manifest.get("T1"), timings=timings) as eng:
        assert not eng.inline(1)
        for _ in range(3):
            await asyncio.gather(*(eng.infer(sample(i)) for i in range(5)))
    assert len(threads) == 1
    assert threads != {threading.current_thread().name}
    assert threads.pop().startswith("vswarm-infer-T1")


@pytest.mark.parametrize("batching", [True, False])
async def test_fast_model_runs_inline_and_slow_batches_in_the_thread(
    tiny_manifest: Manifest, monkeypatch: pytest.MonkeyPatch, batching: bool
) -> None:
    """A model calibrated under inline_max_s runs on the loop; a batch that would take
    longer than that goes to the engine's thread."""
    real_run = ort.InferenceSession.run
    where: list[tuple[str, int]] = []

    def spy_run(self: ort.InferenceSession, output_names: Any, feeds: Any) -> Any:
        where.append((threading.current_thread().name, len(feeds["input"])))
        return real_run(self, output_names, feeds)

    async with Engine(tiny_manifest.get("T1"), batching=batching) as eng:
        assert eng.single_s is not None and eng.single_s > 0
        # Two inputs fit within inline_max_s, three do not: the tiny model is fast, so
        # set the limit between them from its own calibration.
        eng._timings = Timings(max_batch=8, batch_wait_s=0.05, inline_max_s=2.5 * eng.single_s)
        assert eng.inline(2) and not eng.inline(3)
        monkeypatch.setattr(ort.InferenceSession, "run", spy_run)
        for size in (1, 2, 3):
            out = await asyncio.gather(*(eng.infer(sample(i)) for i in range(size)))
            assert [r.probs.shape for r in out] == [(10,)] * size
    loop_thread = threading.current_thread().name
    if batching:
        assert [n for _, n in where] == [1, 2, 3]
        assert [name == loop_thread for name, _ in where] == [True, True, False]
    else:  # every input alone: each fits
        assert [n for _, n in where] == [1] * 6
        assert all(name == loop_thread for name, _ in where)


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


@pytest.mark.parametrize("inline_max_s", [1.0, 0.0])
async def test_model_cpu_is_counted_inline_and_in_the_thread(
    tiny_manifest: Manifest, monkeypatch: pytest.MonkeyPatch, inline_max_s: float
) -> None:
    """The CPU a model's runs take is counted, on the loop and in the engine's thread: it
    is the CPU of the thread that ran them, at most their wall-clock time."""
    real_run = ort.InferenceSession.run

    def busy_run(self: ort.InferenceSession, *args: Any, **kwargs: Any) -> Any:
        end = time.thread_time() + 0.005  # 5 ms of this thread's CPU per run
        while time.thread_time() < end:
            pass
        return real_run(self, *args, **kwargs)

    metrics = Metrics()
    async with Engine(
        tiny_manifest.get("T1"), timings=Timings(inline_max_s=inline_max_s), metrics=metrics
    ) as eng:
        monkeypatch.setattr(ort.InferenceSession, "run", busy_run)
        assert eng.inline(1) == (inline_max_s > 0)
        for i in range(3):
            await eng.infer(sample(i))
    get = metrics.registry.get_sample_value
    cpu, wall = get("vswarm_inference_cpu_seconds_total"), get("vswarm_inference_seconds_sum")
    assert cpu is not None and wall is not None
    assert 3 * 0.005 <= cpu <= wall + 1e-4


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


@pytest.mark.parametrize("inline_max_s", [0.0, 1.0])
@pytest.mark.parametrize("batching", [True, False])
async def test_failing_batch_fails_only_its_callers(
    tiny_manifest: Manifest, monkeypatch: pytest.MonkeyPatch, batching: bool, inline_max_s: float
) -> None:
    """An ORT failure fails that batch's callers with InferenceError; the engine serves on."""
    real_run = ort.InferenceSession.run
    calls = {"n": 0}

    def flaky_run(self: ort.InferenceSession, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ort_state.Fail("injected failure")
        return real_run(self, *args, **kwargs)

    timings = Timings(max_batch=3, batch_wait_s=5.0, inline_max_s=inline_max_s)
    async with Engine(tiny_manifest.get("T1"), timings=timings, batching=batching) as eng:
        assert eng.inline(1) == (inline_max_s > 0)
        monkeypatch.setattr(ort.InferenceSession, "run", flaky_run)
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
