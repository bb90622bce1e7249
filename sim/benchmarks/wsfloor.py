"""The link floor: the bare swarm over aiohttp WebSockets, with the work a call must do.

``python -m sim.benchmarks.wsfloor VARIANT`` serves one variant on 127.0.0.1 at
``GET /ws``: each binary message is a sealed group of asks (``swarm.wire.codec``), opened,
decoded, run as one batch, answered with replies built, signed once and sealed by the
project's own codec and crypto. ``WsFloor`` is the requester's side: one WebSocket per
worker, each call's asks sealed and sent to every worker from the calling task, the
answers opened and decoded by one reader task per WebSocket, one robust decide (with its
certificate), and the reply signatures checked at the requester's sample rate.

What it leaves out is the machinery around that work: no handshake per link (fixed keys),
no discovery, plan, hedging, early exit, coalescing, engine queue, deadlines, reply
binding checks, reputation, metrics or logging. ``sim.bench`` runs it beside
``classify``: classify's distance to it is what that machinery costs, and its own CPU per
call is the least any requester on aiohttp WebSockets and this codec could spend here.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from collections.abc import Sequence
from typing import Final

import aiohttp
import numpy as np
from aiohttp import web

from sim.benchmarks.bare import START_TIMEOUT_S, Workers
from sim.benchmarks.echo import serve_app
from sim.benchmarks.fleet import BenchError
from sim.benchmarks.measure import session
from swarm import aio, config
from swarm.crypto.identity import Identity
from swarm.crypto.session import Sealer
from swarm.decision import voting
from swarm.inference.manifest import load_manifest
from swarm.wire import codec, verify
from swarm.wire.messages import (
    Answers,
    Ask,
    Asks,
    InferReply,
    InferRequest,
    build_request,
    input_sha256,
)

LOOPBACK: Final = "127.0.0.1"
SWARM: Final = "wsfloor"
REQUESTER_ID: Final = "0" * 20
# Fixed link keys: a floor measures a link in use, not its handshake.
TO_PEER_KEY: Final = bytes(range(32))
TO_REQUESTER_KEY: Final = bytes(range(32, 64))
CALL_TIMEOUT_S: Final = 10.0


async def serve(variant: str) -> None:
    manifest = load_manifest()
    spec = manifest.get(variant)
    model = session(spec, threads=1)
    input_name = model.get_inputs()[0].name
    identity = Identity.generate()
    shape = manifest.input.shape
    input_len = int(np.prod(shape))

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=codec.max_asks_size(input_len) + 64)
        await ws.prepare(request)
        into, out = Sealer(TO_PEER_KEY), Sealer(TO_REQUESTER_KEY)
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
            asks = codec.decode_asks(into.open(msg.data), input_len=input_len)
            requests = [_request_of(a, manifest.family_id, shape) for a in asks.items]
            start = time.perf_counter()
            probs = model.run(None, {input_name: np.stack([r.tensor() for r in requests])})[0]
            infer_us = round((time.perf_counter() - start) * 1e6)
            replies = [
                codec.build_reply(
                    r,
                    responder_id=identity.peer_id,
                    variant=spec.name,
                    model_sha256=spec.sha256,
                    probs=p,
                    infer_us=infer_us,
                )
                for r, p in zip(requests, probs, strict=True)
            ]
            batch = codec.sign_replies(identity, replies)
            await ws.send_bytes(out.seal(codec.encode_answers(Answers(asks.exchange, batch))))
        return ws

    app = web.Application()
    app.router.add_get("/ws", link)
    await serve_app(app, identity.public_key.hex())


def _request_of(ask: Ask, family: str, shape: tuple[int, int, int]) -> InferRequest:
    return InferRequest(
        swarm=SWARM,
        family=family,
        request_id=ask.request_id,
        requester_id=REQUESTER_ID,
        input=ask.input,
        input_shape=shape,
        input_sha256=input_sha256(ask.input),
        k=ask.k,
        deadline_ms=ask.deadline_ms,
    )


class _Worker:
    """The requester's WebSocket to one worker; answers matched by exchange number."""

    def __init__(self, name: str, ws: aiohttp.ClientWebSocketResponse, key: bytes) -> None:
        self.name = name
        self.ws = ws
        self.key = key
        self.out, self.into = Sealer(TO_PEER_KEY), Sealer(TO_REQUESTER_KEY)
        self.waiting: dict[int, asyncio.Future[Answers]] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    break
                answers = codec.decode_answers(self.into.open(msg.data), responder_id=self.name)
                future = self.waiting.pop(answers.exchange, None)
                if future is not None and not future.done():
                    future.set_result(answers)
        finally:
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(BenchError(f"wsfloor worker {self.name} went away"))


class WsFloor(Workers):
    """Link-floor workers for ``variants``, and the fan-out to them (see the module)."""

    def __init__(self, variants: Sequence[str]) -> None:
        super().__init__(variants)
        self.manifest = load_manifest()
        self._workers: list[_Worker] = []
        self._session: aiohttp.ClientSession | None = None
        self._exchanges = itertools.count()
        self._sampler = np.random.default_rng(0)

    async def _start(self) -> None:
        for name in self.variants:
            self._procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "sim.benchmarks.wsfloor", name),
                    stdout=asyncio.subprocess.PIPE,
                    stdin=asyncio.subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            )
        self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                for name, proc in zip(self.variants, self._procs, strict=True):
                    assert proc.stdout is not None
                    line = (await proc.stdout.readline()).split()
                    if len(line) != 2 or not line[0].isdigit():
                        raise BenchError(f"wsfloor worker {name} did not start (see its stderr)")
                    ws = await self._session.ws_connect(f"http://{LOOPBACK}:{int(line[0])}/ws")
                    self._workers.append(_Worker(name, ws, bytes.fromhex(line[1].decode())))
        except TimeoutError:
            raise BenchError(f"wsfloor workers not up in {START_TIMEOUT_S:g} s") from None

    async def classify(self, pixels: np.ndarray) -> int:
        """One call: the robust vote over every worker's reply to ``pixels`` (uint8)."""
        request = build_request(
            swarm=SWARM,
            family=self.manifest.family_id,
            requester_id=REQUESTER_ID,
            tensor=pixels,
            shape=self.manifest.input.shape,
            deadline_ms=2000,
        )
        exchange = next(self._exchanges)
        ask = Ask(request.request_id, request.k, request.deadline_ms, request.input)
        message = codec.encode_asks(Asks(exchange, (ask,)))
        loop = asyncio.get_running_loop()
        futures = []
        for worker in self._workers:
            future: asyncio.Future[Answers] = loop.create_future()
            worker.waiting[exchange] = future
            futures.append(future)
            await worker.ws.send_bytes(worker.out.seal(message))
        ballots = []
        sampled = []
        async with asyncio.timeout(CALL_TIMEOUT_S):
            for worker, future in zip(self._workers, futures, strict=True):
                answers = await future
                reply = answers.batch.items[0]
                if not isinstance(reply, InferReply) or reply.request_id != request.request_id:
                    raise BenchError(f"wsfloor worker {worker.name} answered another request")
                topk = reply.topk_probabilities()
                ballots.append(voting.Ballot(worker.name, worker.name, topk, 0.93))
                if self._sampler.random() < config.LATE_SIGNATURE_SAMPLE:
                    sampled.append((answers.batch, worker.key))
        classes = self.manifest.num_classes
        decision = voting.decide(ballots, voting.DEFAULT_RULE, num_classes=classes)
        for batch, key in sampled:
            verify.verify_reply_batch(batch, expected_key=key)
        return decision.label

    async def loop(self, images: Sequence[np.ndarray], *, count: int) -> list[float]:
        """``count`` calls one after another: their latencies (ms)."""
        latencies = []
        for i in range(count):
            start = time.perf_counter()
            await self.classify(images[i % len(images)])
            latencies.append((time.perf_counter() - start) * 1000)
        return latencies

    async def aclose(self) -> None:
        for worker in self._workers:
            worker.reader.cancel()
            await worker.ws.close()
        self._workers.clear()
        if self._session is not None:
            await self._session.close()
        await super().aclose()


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m sim.benchmarks.wsfloor VARIANT\n")
        return 2
    aio.serving_gc()  # as a peer's
    aio.run(serve(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
