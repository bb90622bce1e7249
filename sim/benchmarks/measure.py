"""Measurements the benchmark sections share: raw model runs, the loopback round trip,
classify loops, and a probe that splits a classify call into its stages.

The requester runs in this process, so its stages are timed by wrapping the public
functions it calls (``swarm.wire.codec``, ``swarm.wire.verify``, the link's ``Sealer``,
``swarm.decision.voting``) for the duration of a ``Probe``; they are put back on exit.
Peers run in processes of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

import aiohttp
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from swarm.crypto import identity
from swarm.crypto.session import Sealer
from swarm.decision import voting
from swarm.errors import SwarmError
from swarm.inference.manifest import ModelSpec
from swarm.link.websocket import WsPipe
from swarm.requester import requester
from swarm.requester.call import DEFAULT_POLICY, Policy
from swarm.requester.fanout import ReplyInfo
from swarm.requester.requester import Requester
from swarm.wire import codec, messages, verify
from swarm.wire.messages import Answers

FloatArray = npt.NDArray[np.float32]
THROUGHPUT_BATCH: Final = 32


def session(spec: ModelSpec, threads: int) -> ort.InferenceSession:
    """A plain ONNX Runtime session of ``spec``, as a peer's engine configures it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(spec.file), sess_options=options, providers=["CPUExecutionProvider"]
    )


def run_ms(sess: ort.InferenceSession, x: FloatArray, runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` runs of ``sess`` on ``x`` (after a warm-up)."""
    name = sess.get_inputs()[0].name
    for _ in range(max(3, runs // 10)):
        sess.run(None, {name: x})
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {name: x})
        out.append((time.perf_counter() - start) * 1000)
    return out


def inputs(count: int) -> list[FloatArray]:
    """Held-out Fashion-MNIST test images as canonical tensors (random if unavailable)."""
    try:
        from variants.data import load_split  # noqa: PLC0415  # optional dataset

        images = load_split("test").images[:count]
    except (ImportError, OSError, ValueError):
        images = np.random.default_rng(0).integers(0, 256, (count, 28, 28))
    return [(img.astype(np.float32) / 255.0)[np.newaxis] for img in images]


async def loopback_rtt(runs: int, *, servers: int = 1, body_bytes: int = 64) -> list[float]:
    """Round trips (ms) to trivial aiohttp handlers in processes of their own, keep-alive.

    With ``servers`` > 1 each sample is one POST to every server at once: a fan-out with
    no model, no signature and no vote, the transport's share of a classify call.
    """
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sim.benchmarks.echo",
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for _ in range(servers)
    ]
    try:
        urls = []
        async with asyncio.timeout(30):
            for proc in procs:
                assert proc.stdout is not None
                urls.append(f"http://127.0.0.1:{int(await proc.stdout.readline())}/")
        body = b"x" * body_bytes
        out = []
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as http:

            async def post(url: str) -> None:
                async with http.post(url, data=body) as resp:
                    await resp.read()

            for i in range(runs + 20):
                start = time.perf_counter()
                await asyncio.gather(*(post(url) for url in urls))
                if i >= 20:  # the first ones open the connections and warm up
                    out.append((time.perf_counter() - start) * 1000)
        return out
    finally:
        for proc in procs:
            proc.terminate()
            await proc.wait()


@dataclasses.dataclass
class Loop:
    """What a classify loop measured."""

    latencies_ms: list[float]
    wall_s: float
    cpu_s: float  # this process's CPU time: the requester's
    gc_s: float  # of it, in cyclic garbage collections
    early: int  # calls that skipped a peer (early exit or a hedge)
    failures: int
    # Each decided call's counted replies, in the order they arrived: real ballots.
    replies: list[tuple[ReplyInfo, ...]] = dataclasses.field(default_factory=list)


async def classify_loop(
    req: Requester,
    tensors: Sequence[FloatArray],
    *,
    count: int,
    concurrency: int = 1,
    deadline_ms: int | None = None,
    policy: Policy = DEFAULT_POLICY,
) -> Loop:
    """``count`` classify calls, ``concurrency`` at a time; latencies of those decided."""
    latencies: list[float] = []
    replies: list[tuple[ReplyInfo, ...]] = []
    early = failures = 0
    next_index = 0

    async def worker() -> None:
        nonlocal next_index, early, failures
        while next_index < count:
            i = next_index
            next_index += 1
            start = time.perf_counter()
            try:
                result = await req.classify(
                    tensors[i % len(tensors)], deadline_ms=deadline_ms, policy=policy
                )
            except SwarmError:  # a failed call counts, it does not stop the run
                failures += 1
                continue
            latencies.append((time.perf_counter() - start) * 1000)
            replies.append(result.replies)
            early += bool(result.skipped)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    with gc_time() as collector:
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return Loop(latencies, wall, cpu, collector.seconds, early, failures, replies)


class GcTime:
    """The CPU spent in cyclic garbage collections while counted (the collecting thread's)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.thread_time()
        elif self._start is not None:
            self.seconds += time.thread_time() - self._start
            self._start = None


@contextlib.contextmanager
def gc_time() -> Iterator[GcTime]:
    """Count the garbage collector's CPU in this process until the block ends."""
    counter = GcTime()
    gc.callbacks.append(counter)
    try:
        yield counter
    finally:
        gc.callbacks.remove(counter)


# --- summaries ------------------------------------------------------------------------


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``samples``; NaN when there are none."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """p50, p99, mean and count of ``samples`` (rounded for the report)."""
    return {
        "p50": _round(quantile(samples, 0.5)),
        "p99": _round(quantile(samples, 0.99)),
        "mean": _round(statistics.fmean(samples)) if samples else math.nan,
        "n": len(samples),
    }


def ratio(a: float, b: float) -> float:
    """``a / b`` rounded, NaN when ``b`` is not positive."""
    return round(a / b, 3) if b > 0 and math.isfinite(a) else math.nan


def _round(value: float) -> float:
    return round(value, 4) if math.isfinite(value) else value


@contextlib.contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    """Set ``owner.name`` to ``value`` for the block, then put the old one back."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


class Probe:
    """Time spent per stage (ms, summed per classify call) while it is active.

    It wraps the public functions a call goes through, where the requester's modules
    look them up: building and encoding the asks, sealing and opening the link's
    messages (``Sealer``), decoding the answers, checking each reply's bindings,
    checking batch signatures, voting; and when each message to a peer starts to leave
    (``WsPipe.send``).
    """

    # encode: building the request and packing its asks; seal/open: the link's AEAD;
    # decode: the answers' msgpack; check: a reply's bindings (``verify_reply``);
    # verify: reply-batch signature checks (the dissenters'); infer: the slowest
    # model run a reply reports; send: the rest (the round trips, the event loop).
    STAGES: Final = ("encode", "seal", "open", "decode", "check", "verify", "vote", "infer")
    # The signature checks of the sample the requester checks after a call has
    # answered (scheduled as it returns): part of no call's path. Timed inside
    # ``late()``, kept apart from ``verify`` under this name.
    LATE: Final = "late_check"
    # Of ``vote``, the one decision at the end of a call (``voting.decide``) without the
    # checks for an early exit after each reply: the least robust vote a call makes.
    DECIDE: Final = "decide"
    # When the call's last message to a peer began to leave (ms after the call began):
    # a fan-out's asks go out one by one, and a busy machine spreads them apart.
    LAST_SEND: Final = "last_send_at"

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.calls: list[dict[str, float]] = []
        self.started = 0.0  # time.perf_counter() when the current call began
        self._stack = contextlib.ExitStack()
        self._late = False

    def add(self, stage: str, seconds: float) -> None:
        if self._late and stage == "verify":
            stage = self.LATE
        self.current[stage] = self.current.get(stage, 0.0) + seconds * 1000

    @contextlib.contextmanager
    def late(self) -> Iterator[None]:
        """Signature checks inside the block count as late checks, not ``verify``."""
        self._late = True
        try:
            yield
        finally:
            self._late = False

    def _timed(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, its time added to ``stage``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - start)

        return timed

    def __enter__(self) -> Probe:
        stack = self._stack
        stack.enter_context(
            patched(requester, "build_request", self._timed("encode", messages.build_request))
        )
        stack.enter_context(patched(codec, "encode_asks", self._timed("encode", codec.encode_asks)))
        # A plain function set on the class is a method: ``self`` comes first.
        stack.enter_context(patched(Sealer, "seal", self._timed("seal", Sealer.seal)))
        stack.enter_context(patched(Sealer, "open", self._timed("open", Sealer.open)))
        stack.enter_context(
            patched(codec, "decode_answers", self._decode_with(codec.decode_answers))
        )
        stack.enter_context(
            patched(verify, "verify_reply", self._timed("check", verify.verify_reply))
        )
        # Every signature check of a reply batch goes through this one name.
        stack.enter_context(
            patched(verify, "verify_signature", self._timed("verify", identity.verify_signature))
        )
        stack.enter_context(patched(voting, "can_change", self._timed("vote", voting.can_change)))
        decide = self._timed(self.DECIDE, voting.decide)
        stack.enter_context(patched(voting, "decide", self._timed("vote", decide)))
        stack.enter_context(patched(WsPipe, "send", self._sends(WsPipe.send)))
        return self

    def _sends(self, send: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def timed_send(*args: Any, **kwargs: Any) -> None:
            self.current[self.LAST_SEND] = (time.perf_counter() - self.started) * 1000
            await send(*args, **kwargs)

        return timed_send

    def _decode_with(self, decode: Callable[..., Answers]) -> Callable[..., Answers]:
        timed = self._timed("decode", decode)

        def decode_answers(*args: Any, **kwargs: Any) -> Answers:
            answers: Answers = timed(*args, **kwargs)
            slowest = max((r.infer_us for r in answers.batch.replies), default=0) / 1000
            self.current["infer"] = max(self.current.get("infer", 0.0), slowest)
            return answers

        return decode_answers

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def commit(self, total_ms: float) -> None:
        """Close one call: ``send`` is what the stages timed leave of its latency."""
        stages = dict(self.current)
        known = sum(stages.get(s, 0.0) for s in self.STAGES)
        stages["send"] = max(0.0, total_ms - known)
        stages["total"] = total_ms
        self.calls.append(stages)
        self.current = {}


async def probed_loop(
    req: Requester, tensors: Sequence[FloatArray], count: int
) -> tuple[list[float], list[dict[str, float]]]:
    """Sequential classify calls with each one's stage times. After each call the loop
    runs once with the probe in ``late()``: the sampled signature checks the call
    scheduled as it returned are timed as its late checks."""
    latencies = []
    with Probe() as probe:
        for i in range(count):
            probe.current = {}
            start = probe.started = time.perf_counter()
            result = await req.classify(tensors[i % len(tensors)])
            ms = (time.perf_counter() - start) * 1000
            latencies.append(ms)
            with probe.late():
                await asyncio.sleep(0)
            probe.current["early"] = float(bool(result.skipped))
            probe.commit(ms)
    return latencies, probe.calls
