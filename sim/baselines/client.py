"""The baselines' requester: one call through the stage chain, or to every sub-model.

Every call is bounded by its deadline; a dead or silent device is an outcome (no answer,
or its classes lost), never an exception or a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Sequence
from typing import Any, Final

import aiohttp
import numpy as np

from sim.baselines import wire
from swarm.crypto.identity import Identity

CONNECTOR_LIMIT: Final = 64


@dataclasses.dataclass(frozen=True)
class Device:
    """A baseline peer as the requester knows it."""

    name: str
    url: str
    key: str  # base64 Ed25519 public key
    classes: tuple[int, ...] = ()  # a sub-model's group; empty for a stage


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One classify call: the label (None: no answer) and what it cost or lacked."""

    pred: int | None
    latency_ms: float
    error: str | None = None
    lost_classes: tuple[int, ...] = ()
    answered_by: int = 0


class BaselineClient:
    """Signs requests, calls the devices, checks the signed answers."""

    def __init__(self, identity: Identity, session: aiohttp.ClientSession) -> None:
        self.identity = identity
        self.session = session

    def _head(
        self, image: np.ndarray, deadline_ms: int, chain: list[dict[str, str]]
    ) -> dict[str, Any]:
        head: dict[str, Any] = {
            "id": secrets.token_hex(8),
            "deadline_ms": wire.unix_ms() + deadline_ms,
            "requester": self.identity.public_key_b64,
            "chain": chain,
            "hop": 0,
        }
        head["sig"] = wire.sign(
            self.identity, "request", wire.request_fields(head, wire.digest(image))
        )
        return head

    async def _post(self, url: str, body: bytes) -> tuple[dict[str, Any], np.ndarray]:
        async with self.session.post(url, data=body) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise aiohttp.ClientResponseError(
                    resp.request_info,
                    (),
                    status=resp.status,
                    message=raw[:200].decode(errors="replace"),
                )
        return wire.decode(raw)

    async def chain(self, image: np.ndarray, stages: Sequence[Device], deadline_ms: int) -> Outcome:
        """Model parallelism: the image to the first stage, which hands its output on;
        the last stage's signed probabilities come back along the chain."""
        started = time.monotonic()
        links = [{"url": d.url, "key": d.key} for d in stages]
        head = self._head(image, deadline_ms, links)
        try:
            async with asyncio.timeout(deadline_ms / 1000):
                reply, probs = await self._post(stages[0].url, wire.encode(head, image))
            wire.check(
                stages[-1].key,
                reply.get("sig"),
                "reply",
                {"id": head["id"], "probs": wire.digest(probs)},
            )
        except TimeoutError:
            return Outcome(None, _ms(started), "deadline passed")
        except aiohttp.ClientResponseError as exc:
            return Outcome(None, _ms(started), f"HTTP {exc.status}: {exc.message}")
        except (aiohttp.ClientError, wire.BaselineWireError) as exc:
            return Outcome(None, _ms(started), f"{type(exc).__name__}: {exc}")
        if probs.shape != (1, 10):
            return Outcome(None, _ms(started), f"reply of shape {probs.shape}, not (1, 10)")
        return Outcome(int(probs[0].argmax()), _ms(started), answered_by=len(stages))

    async def _group(self, device: Device, body: bytes, request_id: str) -> np.ndarray | None:
        try:
            reply, probs = await self._post(device.url, body)
            wire.check(
                device.key,
                reply.get("sig"),
                "reply",
                {"id": request_id, "probs": wire.digest(probs)},
            )
        except (aiohttp.ClientError, wire.BaselineWireError):
            return None
        if probs.shape != (1, len(device.classes) + 1):
            return None
        return np.asarray(probs[0])

    async def groups(
        self, image: np.ndarray, models: Sequence[Device], deadline_ms: int
    ) -> Outcome:
        """Class parallelism (sensAI): the image to every sub-model; the answer is the
        class of the most confident group among those that answered in time."""
        started = time.monotonic()
        head = self._head(image, deadline_ms, [])
        body = wire.encode(head, image)
        tasks = [asyncio.ensure_future(self._group(d, body, head["id"])) for d in models]
        _done, pending = await asyncio.wait(tasks, timeout=deadline_ms / 1000)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        best: tuple[float, int] | None = None
        lost: list[int] = []
        answered = 0
        for device, task in zip(models, tasks, strict=True):
            probs = None if task.cancelled() else task.result()
            if probs is None:
                lost.extend(device.classes)
                continue
            answered += 1
            for i, c in enumerate(device.classes):
                if best is None or float(probs[i]) > best[0]:
                    best = (float(probs[i]), c)
        if best is None:
            return Outcome(None, _ms(started), "no sub-model answered", tuple(sorted(lost)))
        return Outcome(best[1], _ms(started), None, tuple(sorted(lost)), answered)


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
