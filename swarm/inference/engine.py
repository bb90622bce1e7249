"""The local model: an ONNX Runtime engine with micro-batching.

``Engine`` runs one variant in one dedicated thread, or on the event loop when the
model is faster than the hand-off to a thread; concurrent ``infer`` calls are gathered
into one batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from swarm import config
from swarm.errors import ConfigError, InferenceError
from swarm.inference.imaging import FloatArray
from swarm.inference.manifest import (
    ModelSpec,
)
from swarm.log import get_logger
from swarm.metrics import Metrics
from swarm.resource import AsyncResource

__all__ = ["Engine", "InferenceResult"]

log = get_logger(__name__)

# Every exception class ONNX Runtime's binding raises (they derive from Exception
# directly), plus the Python-side errors its wrapper raises on bad arguments.
_ORT_ERRORS: Final[tuple[type[Exception], ...]] = (
    *(
        c
        for c in vars(_ort_state).values()
        if isinstance(c, type) and issubclass(c, Exception) and c.__module__ == _ort_state.__name__
    ),
    RuntimeError,
    ValueError,
    TypeError,
)

# Runs of one input that time the model when an engine starts (and warm it up).
CALIBRATION_RUNS: Final = 21

# --- engine -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class InferenceResult:
    """One input's class probabilities and the run that produced them."""

    probs: FloatArray  # shape (classes,), this caller's own copy
    seconds: float  # time the model took for the whole batch this input ran in
    batch_size: int


@dataclasses.dataclass(slots=True)
class _Pending:
    x: FloatArray
    future: asyncio.Future[InferenceResult]


class Engine(AsyncResource):
    """One ONNX variant with micro-batching, run in one dedicated thread or inline.

    Concurrent ``infer`` calls are queued; a batcher task takes the first waiting input,
    gathers more for at most ``Timings.batch_wait_s`` (up to ``Timings.max_batch``), and
    runs them as one batch. While a batch runs, new inputs queue up and form the next.

    At start the engine times the model on one input (``CALIBRATION_RUNS`` runs, which
    also warm it up). A batch expected to take at most ``Timings.inline_max_s`` runs on
    the event loop itself: for the small variants the thread hand-off (a wake-up of the
    thread, then of the loop) costs more CPU and latency than the model. Anything longer
    runs in the thread, so the loop never waits on a model for long.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        threads: int = 1,
        timings: config.Timings = config.DEFAULT_TIMINGS,
        batching: bool = True,
        metrics: Metrics | None = None,
        input_shape: tuple[int, int, int] = config.INPUT_SHAPE,
        num_classes: int = config.NUM_CLASSES,
    ) -> None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if timings.max_batch < 1 or timings.batch_wait_s < 0:
            raise ConfigError("Timings.max_batch must be >= 1 and batch_wait_s >= 0")
        self.spec = spec
        self.input_shape = input_shape  # the family's (C, H, W), from its manifest
        self.num_classes = num_classes
        self._threads = threads
        self._timings = timings
        self._batching = batching
        self._metrics = metrics
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._session: ort.InferenceSession | None = None
        self._output_name = ""
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=config.MAX_INFER_QUEUE)
        self._batcher: asyncio.Task[None] | None = None
        self._in_thread: set[concurrent.futures.Future[Any]] = set()  # to wait for on close
        self.single_s: float | None = None  # calibrated batch-1 latency, once started
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return (
            f"<Engine {self.spec.name} {state} batching={self._batching} "
            f"queued={self._queue.qsize()}>"
        )

    async def start(self) -> None:
        """Check and load the model in the engine's thread; start the batcher."""
        if self._closed:
            raise InferenceError("engine is closed")
        if self._started:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"vswarm-infer-{self.spec.name}"
        )
        loading = self._executor.submit(self._load)
        self._in_thread.add(loading)
        loading.add_done_callback(self._in_thread.discard)
        try:
            self._session, self._output_name = await asyncio.wrap_future(loading)
            self.single_s = await asyncio.wrap_future(self._executor.submit(self._calibrate))
        except BaseException:
            await self.aclose()
            raise
        if self._batching:
            self._batcher = asyncio.create_task(
                self._run_batches(), name=f"vswarm-batcher-{self.spec.name}"
            )
        self._started = True
        log.info(
            "engine_started",
            model=self.spec.name,
            threads=self._threads,
            single_ms=round(self.single_s * 1000, 3),
            inline=self.inline(1),
        )

    def inline(self, size: int) -> bool:
        """Whether a batch of ``size`` inputs runs on the event loop (see the class)."""
        if self.single_s is None:
            return False
        # Batching makes an input cheaper, never dearer: size x one input bounds a batch.
        return size * self.single_s <= self._timings.inline_max_s

    async def infer(self, x: FloatArray) -> InferenceResult:
        """Class probabilities for one canonical input of shape (1, 28, 28)."""
        if x.shape != self.input_shape or x.dtype != np.float32:
            raise InferenceError(
                f"input must be float32 of shape {self.input_shape}, got {x.dtype} {x.shape}"
            )
        self._check_running()
        if not self._batching:
            probs, seconds = await self._execute(x[np.newaxis])
            if not np.isfinite(probs[0]).all():
                raise _non_finite(self.spec.name)
            return InferenceResult(probs[0].copy(), seconds, 1)
        future: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        pending = _Pending(x, future)
        await self._queue.put(pending)
        try:
            self._check_running()  # closed while this call waited for room in the queue
        except InferenceError as exc:
            _fail([pending], exc)
        return await future

    def _check_running(self) -> None:
        if self._closed or not self._started:
            raise InferenceError(f"engine for {self.spec.name} is not running")

    async def aclose(self) -> None:
        """Stop the batcher, fail what is queued, and release the thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._batcher is not None:
            self._batcher.cancel()
            # asyncio.wait, unlike awaiting the task, lets a cancellation of aclose itself
            # propagate instead of being mistaken for the batcher's.
            await asyncio.wait({self._batcher})
        leftovers = []
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        _fail(leftovers, InferenceError("engine closed"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            running = {asyncio.wrap_future(f) for f in self._in_thread if not f.done()}
            if running:
                done, stuck = await asyncio.wait(running, timeout=self._timings.deadline_s)
                for finished in done:  # its caller is gone: retrieve, or asyncio complains
                    if not finished.cancelled():
                        finished.exception()
                if stuck:
                    log.warning("engine_thread_stuck", model=self.spec.name)
                    return
            self._executor.shutdown(wait=True)  # the thread is idle now: returns at once
        self._session = None
        log.info("engine_closed", model=self.spec.name)

    # -- in the event loop --

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch: list[_Pending] = []
            try:
                batch.append(await self._queue.get())
                deadline = loop.time() + self._timings.batch_wait_s
                while len(batch) < self._timings.max_batch:
                    if not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                        continue
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            batch.append(await self._queue.get())
                    except TimeoutError:
                        break
                await self._serve(batch)
            except asyncio.CancelledError:
                _fail(batch, InferenceError("engine closed"))
                raise

    async def _serve(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # skip callers that gave up
        if not live:
            return
        try:
            probs, seconds = await self._execute(np.stack([p.x for p in live]))
        except InferenceError as exc:
            log.warning(
                "inference_batch_failed", model=self.spec.name, size=len(live), error=str(exc)
            )
            _fail(live, exc)
            return
        except Exception as exc:
            # The batcher is the engine's only worker: a bug here must fail this batch's
            # callers, be logged in full, and leave the engine serving the next batch.
            log.exception("inference_batch_crashed", model=self.spec.name, size=len(live))
            _fail(live, InferenceError(f"inference crashed: {exc!r}"))
            return
        for i, pending in enumerate(live):
            if pending.future.done():
                continue
            if np.isfinite(probs[i]).all():
                pending.future.set_result(InferenceResult(probs[i].copy(), seconds, len(live)))
            else:  # one bad input must not cost the rest of its batch their answers
                pending.future.set_exception(_non_finite(self.spec.name))

    async def _execute(self, xs: FloatArray) -> tuple[FloatArray, float]:
        if self._executor is None:
            raise InferenceError("engine is not running")
        if self.inline(len(xs)):
            probs, seconds, cpu_s = self._run(xs)
        else:
            work = self._executor.submit(self._run, xs)
            self._in_thread.add(work)
            work.add_done_callback(self._in_thread.discard)
            probs, seconds, cpu_s = await asyncio.wrap_future(work)
        if self._metrics is not None:
            self._metrics.observe_batch(len(xs), seconds, cpu_s)
        return probs, seconds

    # -- in the engine's thread (or inline, see ``inline``) --

    def _calibrate(self) -> float:
        x = np.zeros((1, *self.input_shape), dtype=np.float32)
        return statistics.median(self._run(x)[1] for _ in range(CALIBRATION_RUNS))

    def _load(self) -> tuple[ort.InferenceSession, str]:
        path = self.spec.file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InferenceError(
                f"model file {path} not found: export the variants or fix the manifest"
            ) from None
        except OSError as exc:
            raise InferenceError(f"cannot read model file {path}: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.spec.sha256:
            raise InferenceError(
                f"model file {path} has sha256 {digest} but the manifest says "
                f"{self.spec.sha256}: the file is corrupt or the manifest is stale; "
                "re-export the model or update the manifest"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT's warnings go to its own stderr
        try:
            # Load the bytes that were hashed, so the file cannot change in between.
            session = ort.InferenceSession(
                data, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except _ORT_ERRORS as exc:
            raise InferenceError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        return session, _check_interface(session, path, self.input_shape, self.num_classes)

    def _run(self, xs: FloatArray) -> tuple[FloatArray, float, float]:
        """Probabilities for ``xs``, the seconds the model took, and the CPU seconds of
        this thread meanwhile: less than the seconds when the model waited for a core,
        and all of its CPU with one ONNX Runtime thread (the default), which runs here."""
        session = self._session
        if session is None:
            raise InferenceError("engine is closed")
        cpu = time.thread_time()
        start = time.perf_counter()
        try:
            outputs = session.run([self._output_name], {config.INPUT_NAME: xs})
        except _ORT_ERRORS as exc:
            raise InferenceError(
                f"model {self.spec.name} failed on a batch of {len(xs)}: {exc}"
            ) from exc
        seconds = time.perf_counter() - start
        cpu = time.thread_time() - cpu
        probs = np.asarray(outputs[0], dtype=np.float32)
        if probs.shape != (len(xs), self.num_classes):
            raise InferenceError(
                f"model {self.spec.name} returned shape {probs.shape}, "
                f"expected ({len(xs)}, {self.num_classes})"
            )
        return probs, seconds, cpu


def _check_interface(
    session: ort.InferenceSession, path: Path, input_shape: tuple[int, ...], num_classes: int
) -> str:
    """Check the family's interface; return the output's name."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    dims = ", ".join(map(str, input_shape))
    want = (
        f"input {config.INPUT_NAME!r} float32 [N, {dims}] -> one float32 output [N, {num_classes}]"
    )
    if len(inputs) != 1 or len(outputs) != 1:
        raise InferenceError(f"{path}: has {len(inputs)} inputs, {len(outputs)} outputs; {want}")
    inp, out = inputs[0], outputs[0]
    in_shape, out_shape = list(inp.shape), list(out.shape)

    def dynamic(dim: object) -> bool:  # a named or unknown dimension, not a fixed int
        return not isinstance(dim, int)

    ok = (
        inp.name == config.INPUT_NAME
        and inp.type == "tensor(float)"
        and len(in_shape) == 4
        and dynamic(in_shape[0])
        and in_shape[1:] == list(input_shape)
        and out.type == "tensor(float)"
        and len(out_shape) == 2
        and dynamic(out_shape[0])
        and out_shape[1] == num_classes
    )
    if not ok:
        got = f"{inp.name!r} {inp.type} {in_shape} -> {out.name!r} {out.type} {out_shape}"
        raise InferenceError(f"{path}: interface is {got}; expected {want}")
    return str(out.name)


def _non_finite(model: str) -> InferenceError:
    return InferenceError(f"model {model} returned non-finite probabilities for this input")


def _fail(batch: Sequence[_Pending], exc: InferenceError) -> None:
    for pending in batch:
        if not pending.future.done():
            # Each caller gets its own exception object: one instance raised in several
            # tasks would collect all their tracebacks.
            err = InferenceError(str(exc))
            err.__cause__ = exc.__cause__ or exc
            pending.future.set_exception(err)
