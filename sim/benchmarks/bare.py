"""The bare swarm: the least a swarm of one process per variant costs in Python.

``python -m sim.benchmarks.bare VARIANT`` serves one variant's model on 127.0.0.1 with
nothing around it: a request is a binary frame (an id and the 784 float32 pixels), its
answer another (the id and the top-2 classes with their probabilities). Every frame
waiting when the process wakes runs as one batch, as the peers' micro-batching does. It
prints its port on stdout and serves until SIGTERM or SIGINT.

``BareSwarm`` is the requester's side: one connection per worker, each input sent to
every worker at once, the top-2 answers summed (the paper's rule) and the largest
taken. No msgpack, no WebSocket, no AEAD, signature, freshness or replay check, no
robust vote or certificate, no discovery: what remains is the processes, their models,
loopback TCP and the event loop. ``sim.bench`` measures it beside ``classify`` against
the same floor, in the same run: the part of the distance to the floor that no protocol
work could remove on these cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final, Self

import numpy as np

from sim.benchmarks.fleet import BenchError
from sim.benchmarks.measure import FloatArray, session
from swarm import aio, config
from swarm.errors import SwarmError
from swarm.inference.manifest import Manifest, default_manifest_path, load_manifest

LOOPBACK: Final = "127.0.0.1"
PIXELS: Final = 28 * 28
REQUEST: Final = struct.Struct("<II")  # request id, float32 count (PIXELS), then the pixels
ANSWER: Final = struct.Struct("<IIfIf")  # request id, (class, probability) x 2
FRAME_BYTES: Final = REQUEST.size + 4 * PIXELS
START_TIMEOUT_S: Final = 60.0
CALL_TIMEOUT_S: Final = 10.0


class _Server(asyncio.Protocol):
    """One requester's connection to a worker: frames in, answers out."""

    def __init__(self, model: _Model) -> None:
        self.model = model
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        ids: list[int] = []
        pixels: list[bytes] = []
        while len(self.buffer) >= REQUEST.size:
            request_id, count = REQUEST.unpack_from(self.buffer)
            if count != PIXELS:
                sys.stderr.write(
                    f"bare worker: a frame of {count} values, expected {PIXELS}; "
                    "closing the connection\n"
                )
                assert self.transport is not None
                self.transport.close()
                self.buffer.clear()
                return
            if len(self.buffer) < FRAME_BYTES:
                break
            ids.append(request_id)
            pixels.append(bytes(self.buffer[REQUEST.size : FRAME_BYTES]))
            del self.buffer[:FRAME_BYTES]
        if ids and self.transport is not None:
            self.transport.write(self.model.answer(ids, pixels))


class _Model:
    def __init__(self, manifest: Manifest, variant: str) -> None:
        self.session = session(manifest.get(variant), threads=1)
        self.input = self.session.get_inputs()[0].name

    def answer(self, ids: Sequence[int], pixels: Sequence[bytes]) -> bytes:
        """Run the frames' inputs as one batch; their answers, in order."""
        x = np.frombuffer(b"".join(pixels), np.float32).reshape(len(ids), *config.INPUT_SHAPE)
        probs = self.session.run(None, {self.input: x})[0]
        top = np.argsort(-probs, axis=1, kind="stable")[:, :2]
        return b"".join(
            ANSWER.pack(i, int(a), float(row[a]), int(b), float(row[b]))
            for i, row, (a, b) in zip(ids, probs, top, strict=True)
        )


async def serve(variant: str) -> None:
    model = _Model(load_manifest(default_manifest_path()), variant)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Server(model), LOOPBACK, 0)
    sys.stdout.write(f"{server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


class _Link(asyncio.Protocol):
    """The requester's connection to one worker: answers matched to their ids."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.buffer = bytearray()
        self.waiting: dict[int, asyncio.Future[tuple[int, float, int, float]]] = {}
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        size = ANSWER.size
        while len(self.buffer) >= size:
            request_id, a, pa, b, pb = ANSWER.unpack_from(self.buffer)
            del self.buffer[:size]
            future = self.waiting.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result((a, pa, b, pb))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(
                    BenchError(f"bare worker {self.name} closed its connection (see its stderr)")
                )
        self.waiting.clear()


class Workers:
    """Worker processes, one per variant: ``async with`` starts them (``_start``) and
    stops them (``aclose``), also when starting fails."""

    def __init__(self, variants: Sequence[str]) -> None:
        self.variants = tuple(variants)
        self._procs: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def processes(self) -> tuple[asyncio.subprocess.Process, ...]:
        """The workers' processes, in the order of ``variants``."""
        return tuple(self._procs)

    async def _start(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        await stop_processes(self._procs)
        self._procs.clear()


class BareSwarm(Workers):
    """Bare workers for ``variants``, and the fan-out to them (see the module)."""

    def __init__(self, variants: Sequence[str]) -> None:
        super().__init__(variants)
        self._links: list[_Link] = []
        self.ports: list[int] = []  # each worker's, in the order of ``variants``
        self._ids = itertools.count(1)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for name in self.variants:
            self._procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "sim.benchmarks.bare",
                    name,
                    stdout=asyncio.subprocess.PIPE,
                    stdin=asyncio.subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            )
        async with _timeout(START_TIMEOUT_S, "start"):
            for name, proc in zip(self.variants, self._procs, strict=True):
                assert proc.stdout is not None
                line = await proc.stdout.readline()
                if not line.strip().isdigit():
                    raise BenchError(
                        f"bare worker {name} did not start (it printed {line[:80]!r}; "
                        "its error is on stderr above)"
                    )
                port = int(line)
                _, link = await loop.create_connection(
                    functools.partial(_Link, name), LOOPBACK, port
                )
                self.ports.append(port)
                self._links.append(link)

    async def classify(self, x: FloatArray) -> int:
        """The class with the largest of ``scores(x)``, ties to the lower index."""
        scores = await self.scores(x)
        return max(range(len(scores)), key=scores.__getitem__)

    async def scores(self, x: FloatArray) -> list[float]:
        """Per class, the sum of the workers' top-2 probabilities for ``x``."""
        loop = asyncio.get_running_loop()
        request_id = next(self._ids) & 0xFFFFFFFF
        frame = REQUEST.pack(request_id, PIXELS) + np.ascontiguousarray(x, np.float32).tobytes()
        futures = []
        for link in self._links:
            if link.transport is None:
                raise BenchError(f"bare worker {link.name} is not connected")
            future: asyncio.Future[tuple[int, float, int, float]] = loop.create_future()
            link.waiting[request_id] = future
            link.transport.write(frame)
            futures.append(future)
        scores = [0.0] * config.NUM_CLASSES
        async with _timeout(CALL_TIMEOUT_S, "answer a call"):
            for future in futures:
                a, pa, b, pb = await future
                scores[a] += pa
                scores[b] += pb
        return scores

    async def loop(
        self, tensors: Sequence[FloatArray], *, count: int, concurrency: int = 1
    ) -> tuple[list[float], float]:
        """``count`` calls, ``concurrency`` at a time: their latencies (ms), the wall (s)."""
        latencies: list[float] = []
        calls = iter(range(count))

        async def worker() -> None:
            for i in calls:
                start = time.perf_counter()
                await self.classify(tensors[i % len(tensors)])
                latencies.append((time.perf_counter() - start) * 1000)

        wall0 = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())
        return latencies, time.perf_counter() - wall0

    async def aclose(self) -> None:
        for link in self._links:
            if link.transport is not None:
                link.transport.close()
        self._links.clear()
        await super().aclose()


async def stop_processes(procs: Sequence[asyncio.subprocess.Process]) -> None:
    """SIGTERM ``procs``, then SIGKILL those still alive after 10 s."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    for proc in procs:
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def _timeout(seconds: float, what: str) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise BenchError(f"the bare workers did not {what} within {seconds:g} s") from None


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m sim.benchmarks.bare VARIANT\n")
        return 2
    aio.serving_gc()  # as a peer's
    try:
        aio.run(serve(argv[0]))
    except SwarmError as exc:  # an unknown variant, a model that does not load
        sys.stderr.write(f"bare worker: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
