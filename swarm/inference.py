"""The local model: the manifest, an ONNX Runtime engine with micro-batching, input decoding.

``load_manifest`` reads ``variants/manifest.json`` (see ``variants/MANIFEST.md``).
``Engine`` runs one variant off the event loop in one dedicated thread; concurrent
``infer`` calls are gathered into one batch. ``decode_image`` turns untrusted bytes (PNG,
JPEG, .npy) into the canonical 1x28x28 float32 tensor in [0, 1].
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import importlib.resources
import io
import json
import math
import struct
import time
import tokenize
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state
from PIL import Image, ImageOps

from swarm import config
from swarm.errors import ConfigError, DecodeError, InferenceError, MessageTooLargeError
from swarm.log import get_logger
from swarm.metrics import Metrics

log = get_logger(__name__)

MANIFEST_NAME: Final = "manifest.json"
MANIFEST_SCHEMA: Final = 1
ROLES: Final = ("variant", "reference")

FloatArray = npt.NDArray[np.float32]

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


# --- manifest ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """One shipped model as the manifest describes it; ``file`` is absolute."""

    name: str
    role: str
    file: Path
    sha256: str
    params: int
    macs: int
    resolution: int
    width: float
    val_accuracy: float
    test_accuracy: float
    latency_ms: float


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """The models that exist and the class names they share."""

    path: Path
    class_names: tuple[str, ...]
    models: tuple[ModelSpec, ...]

    def get(self, name: str) -> ModelSpec:
        """The model called ``name``; ConfigError listing the known names otherwise."""
        for spec in self.models:
            if spec.name == name:
                return spec
        known = ", ".join(m.name for m in self.models)
        raise ConfigError(f"no model named {name!r} in {self.path}; known models: {known}")

    @property
    def variants(self) -> tuple[ModelSpec, ...]:
        """The models a peer may serve (role ``variant``)."""
        return tuple(m for m in self.models if m.role == "variant")


def default_manifest_path() -> Path:
    """``manifest.json`` inside the installed ``variants`` package (or the source tree)."""
    try:
        root = importlib.resources.files("variants")
    except ModuleNotFoundError:
        root = None
    if isinstance(root, Path):
        return root / MANIFEST_NAME
    return Path(__file__).resolve().parent.parent / "variants" / MANIFEST_NAME


def load_manifest(path: Path | None = None) -> Manifest:
    """Read and check a manifest; ConfigError says what is wrong and what to do."""
    path = (path if path is not None else default_manifest_path()).resolve()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"model manifest not found at {path}: train and export the variants "
            "(see variants/MANIFEST.md) or pass the path of a manifest.json"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read model manifest {path}: {exc}") from exc
    try:
        return _parse_manifest(path, raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"malformed model manifest {path}: {exc}; see variants/MANIFEST.md for the format"
        ) from exc


def _parse_manifest(path: Path, raw: Any) -> Manifest:
    if not isinstance(raw, dict):
        raise TypeError("top level must be a JSON object")
    if raw.get("schema") != MANIFEST_SCHEMA:
        raise ValueError(f"schema is {raw.get('schema')!r}, this runtime reads {MANIFEST_SCHEMA}")
    want_in = [None, *config.INPUT_SHAPE]
    if raw["input"].get("name") != config.INPUT_NAME or raw["input"].get("shape") != want_in:
        raise ValueError(f"input must be named {config.INPUT_NAME!r} with shape {want_in}")
    if raw["output"].get("shape") != [None, config.NUM_CLASSES]:
        raise ValueError(f"output shape must be [null, {config.NUM_CLASSES}]")
    names = raw["class_names"]
    if not (
        isinstance(names, list)
        and len(names) == config.NUM_CLASSES
        and all(isinstance(n, str) for n in names)
    ):
        raise ValueError(f"class_names must be a list of {config.NUM_CLASSES} strings")
    entries = raw["models"]
    if not isinstance(entries, list) or not entries:
        raise ValueError("models must be a non-empty list")
    models = tuple(_parse_model(path.parent, entry) for entry in entries)
    seen = [m.name for m in models]
    if len(set(seen)) != len(seen):
        raise ValueError(f"model names must be unique, got {seen}")
    return Manifest(path=path, class_names=tuple(names), models=models)


def _parse_model(folder: Path, entry: Any) -> ModelSpec:
    if not isinstance(entry, dict):
        raise TypeError(f"each model must be an object, got {entry!r}")
    name = _str(entry, "name")
    role = _str(entry, "role")
    if role not in ROLES:
        raise ValueError(f"model {name!r}: role must be one of {ROLES}, got {role!r}")
    sha = _str(entry, "sha256").lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"model {name!r}: sha256 must be 64 hex digits")
    return ModelSpec(
        name=name,
        role=role,
        file=(folder / _str(entry, "file")).resolve(),
        sha256=sha,
        params=_int(entry, "params"),
        macs=_int(entry, "macs"),
        resolution=_int(entry, "resolution"),
        width=_float(entry, "width"),
        val_accuracy=_float(entry, "val_accuracy"),
        test_accuracy=_float(entry, "test_accuracy"),
        latency_ms=_float(entry, "latency_ms"),
    )


def _str(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise TypeError(f"model {entry.get('name')!r}: {key!r} must be a non-empty string")
    return value


def _int(entry: dict[str, Any], key: str) -> int:
    value = entry.get(key)
    # bool is an int in Python, but never a count here.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"model {entry.get('name')!r}: {key!r} must be an integer >= 0")
    return value


def _float(entry: dict[str, Any], key: str) -> float:
    value = entry.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise TypeError(f"model {entry.get('name')!r}: {key!r} must be a finite number")
    return float(value)


# --- engine -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class InferenceResult:
    """One input's class probabilities and the run that produced them."""

    probs: FloatArray  # shape (NUM_CLASSES,), this caller's own copy
    seconds: float  # time the model took for the whole batch this input ran in
    batch_size: int


@dataclasses.dataclass(slots=True)
class _Pending:
    x: FloatArray
    future: asyncio.Future[InferenceResult]


class Engine:
    """One ONNX variant, run in one dedicated thread, with micro-batching.

    Concurrent ``infer`` calls are queued; a batcher task takes the first waiting input,
    gathers more for at most ``Timings.batch_wait_s`` (up to ``Timings.max_batch``), and
    runs them as one batch. While a batch runs, new inputs queue up and form the next.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        threads: int = 1,
        timings: config.Timings = config.DEFAULT_TIMINGS,
        batching: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if timings.max_batch < 1 or timings.batch_wait_s < 0:
            raise ConfigError("Timings.max_batch must be >= 1 and batch_wait_s >= 0")
        self.spec = spec
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
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return (
            f"<Engine {self.spec.name} {state} batching={self._batching} "
            f"queued={self._queue.qsize()}>"
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

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
        except BaseException:
            await self.aclose()
            raise
        if self._batching:
            self._batcher = asyncio.create_task(
                self._run_batches(), name=f"vswarm-batcher-{self.spec.name}"
            )
        self._started = True
        log.info("engine_started", model=self.spec.name, threads=self._threads)

    async def infer(self, x: FloatArray) -> InferenceResult:
        """Class probabilities for one canonical input of shape (1, 28, 28)."""
        if x.shape != config.INPUT_SHAPE or x.dtype != np.float32:
            raise InferenceError(
                f"input must be float32 of shape {config.INPUT_SHAPE}, got {x.dtype} {x.shape}"
            )
        self._check_running()
        if not self._batching:
            probs, seconds = await self._run_in_thread(x[np.newaxis])
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
            probs, seconds = await self._run_in_thread(np.stack([p.x for p in live]))
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

    async def _run_in_thread(self, xs: FloatArray) -> tuple[FloatArray, float]:
        if self._executor is None:
            raise InferenceError("engine is not running")
        work = self._executor.submit(self._run, xs)
        self._in_thread.add(work)
        work.add_done_callback(self._in_thread.discard)
        probs, seconds = await asyncio.wrap_future(work)
        if self._metrics is not None:
            self._metrics.observe_batch(len(xs), seconds)
        return probs, seconds

    # -- in the engine's thread --

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
        return session, _check_interface(session, path)

    def _run(self, xs: FloatArray) -> tuple[FloatArray, float]:
        session = self._session
        if session is None:
            raise InferenceError("engine is closed")
        start = time.perf_counter()
        try:
            outputs = session.run([self._output_name], {config.INPUT_NAME: xs})
        except _ORT_ERRORS as exc:
            raise InferenceError(
                f"model {self.spec.name} failed on a batch of {len(xs)}: {exc}"
            ) from exc
        seconds = time.perf_counter() - start
        probs = np.asarray(outputs[0], dtype=np.float32)
        if probs.shape != (len(xs), config.NUM_CLASSES):
            raise InferenceError(
                f"model {self.spec.name} returned shape {probs.shape}, "
                f"expected ({len(xs)}, {config.NUM_CLASSES})"
            )
        return probs, seconds


def _check_interface(session: ort.InferenceSession, path: Path) -> str:
    """Check the shipped interface; return the output's name."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want = f"input {config.INPUT_NAME!r} float32 [N, 1, 28, 28] -> one float32 output [N, 10]"
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
        and in_shape[1:] == list(config.INPUT_SHAPE)
        and out.type == "tensor(float)"
        and len(out_shape) == 2
        and dynamic(out_shape[0])
        and out_shape[1] == config.NUM_CLASSES
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


def top_k(probs: FloatArray, k: int = config.DEFAULT_TOP_K) -> tuple[tuple[int, float], ...]:
    """The ``k`` most probable (class, probability) pairs, ties to the lower class index."""
    if not 1 <= k <= config.MAX_TOP_K:
        raise ValueError(f"k must be in 1..{config.MAX_TOP_K}, got {k}")
    order = np.argsort(-probs, kind="stable")[:k]
    return tuple((int(i), float(probs[i])) for i in order)


# --- input decoding ---------------------------------------------------------------------


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
