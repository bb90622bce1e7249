"""Real peer processes on loopback for the benchmark, and an in-process requester.

Every peer is ``python -m swarm.peer --interface 127.0.0.1``: its HTTP and its mDNS stay
on loopback. ``Fleet`` owns the processes it starts and stops them on exit, whatever
happened; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from swarm.config import DEFAULT_TIMINGS, Timings
from swarm.crypto.identity import Identity, TrustStore
from swarm.decision.reputation import ReputationBook
from swarm.discovery.mdns import Discovery
from swarm.discovery.table import PeerTable
from swarm.inference.manifest import Manifest
from swarm.metrics import NAMESPACE
from swarm.requester.requester import Requester

LOOPBACK: Final = "127.0.0.1"
READY_TIMEOUT_S: Final = 90.0  # imports and mDNS probing of many peers on two cores
STOP_TIMEOUT_S: Final = 10.0
HTTP_TIMEOUT_S: Final = 5.0


class BenchError(RuntimeError):
    """A benchmark process failed to start or answer; the message says why."""


class Peer:
    """One running peer process and what its ready line said."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.name = name
        self.proc = proc
        self.stderr = stderr
        self.ready: dict[str, Any] = {}
        self.ready_at = 0.0  # time.monotonic() when the ready line arrived

    def __repr__(self) -> str:
        return f"<Peer {self.name} pid={self.proc.pid} ready={bool(self.ready)}>"

    @property
    def peer_id(self) -> str:
        return str(self.ready["peer_id"])

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.ready['port']}"

    async def wait_ready(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        async with asyncio.timeout(READY_TIMEOUT_S):
            while True:
                line = await stdout.readline()
                if not line:
                    err = self.stderr.read_text(errors="replace")[-2000:]
                    raise BenchError(f"peer {self.name} exited before ready: {err}")
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("event") == "ready":
                        self.ready = event
                        self.ready_at = time.monotonic()
                        return

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


class Fleet:
    """Peer processes of one swarm, started on demand, all stopped on exit."""

    def __init__(
        self, workdir: Path, *, extra: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.swarm = "bench" + secrets.token_hex(4)
        self.extra = list(extra)
        self.env = dict(env or {})
        self.peers: list[Peer] = []
        workdir.mkdir(parents=True, exist_ok=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self, variants: Sequence[str]) -> list[Peer]:
        """Start one peer per entry of ``variants`` and wait until all are ready."""
        started = [await self._spawn(v) for v in variants]
        await asyncio.gather(*(p.wait_ready() for p in started))
        return started

    async def _spawn(self, variant: str) -> Peer:
        name = f"p{len(self.peers)}-{variant}"
        stderr = self.workdir / f"{self.swarm}-{name}.stderr"
        args = [
            *("-m", "swarm.peer", "--variant", variant, "--interface", LOOPBACK),
            *("--port", "0", "--swarm", self.swarm, "--log-format", "json"),
            *("--log-level", "warning", "--data-dir", str(self.workdir / self.swarm / name)),
            *self.extra,
        ]
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        peer = Peer(name, proc, stderr)
        self.peers.append(peer)
        return peer

    async def aclose(self) -> None:
        """SIGCONT and SIGTERM every peer, then SIGKILL what lingers; idempotent."""
        live = [p for p in self.peers if p.proc.returncode is None]
        for peer in live:
            with contextlib.suppress(ProcessLookupError):
                peer.resume()
                peer.proc.terminate()
        for peer in live:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await peer.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    peer.proc.kill()
                await peer.proc.wait()


def cpu_seconds(peer: Peer) -> float:
    """CPU time (user + system) ``peer``'s process has used so far, from /proc."""
    return process_cpu_seconds(peer.proc.pid)


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far, from /proc; 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The /metrics samples ``model_seconds`` sums: the models' wall clock and their own CPU.
MODEL_SECONDS: Final = (
    f"{NAMESPACE}_inference_seconds_sum",
    f"{NAMESPACE}_inference_cpu_seconds_total",
)
# The batch size histogram's sum and count: their ratio is the mean batch.
BATCH_SIZES: Final = (f"{NAMESPACE}_batch_size_sum", f"{NAMESPACE}_batch_size_count")


async def model_seconds(peers: Sequence[Peer]) -> np.ndarray:
    """Seconds the peers' models have run so far, all together, as [wall, cpu]: the sum
    of each peer's ``inference_seconds`` histogram and ``inference_cpu_seconds`` counter
    on its /metrics. With ``cpu_seconds`` they split a peer's CPU into its model and
    everything around it (HTTP, JSON, crypto, the loop). The wall clock counts a run's
    waits for a core too; the CPU is the model's own (one ONNX Runtime thread)."""
    return await metric_sums(peers, MODEL_SECONDS)


async def metric_sums(peers: Sequence[Peer], names: Sequence[str]) -> np.ndarray:
    """Each of the samples ``names``, summed over the peers' /metrics (each read once)."""
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        texts = await asyncio.gather(*(_metrics_text(session, p) for p in peers))
    total = np.zeros(len(names))
    for peer, text in zip(peers, texts, strict=True):
        found = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in names
        }
        if set(found) != set(names):
            raise BenchError(f"{peer.name}'s /metrics lacks {', '.join(set(names) - set(found))}")
        total += [found[name] for name in names]
    return total


async def _metrics_text(session: aiohttp.ClientSession, peer: Peer) -> str:
    try:
        async with session.get(peer.url + "/metrics") as resp:
            resp.raise_for_status()
            return await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"{peer.name} did not serve /metrics: {exc!r}") from exc


async def seen_by(session: aiohttp.ClientSession, peer: Peer) -> set[str]:
    """The peer ids ``peer`` lists in its /v1/info (empty if it does not answer)."""
    try:
        async with session.get(peer.url + "/v1/info") as resp:
            info = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return set()
    return {str(p["peer_id"]) for p in info.get("peers", [])}


async def wait_all_see(peers: Sequence[Peer], timeout_s: float, interval_s: float = 0.05) -> float:
    """Seconds until every peer lists every other one; ``inf`` if not within timeout."""
    ids = {p.peer_id for p in peers}
    start = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() - start < timeout_s:
            views = await asyncio.gather(*(seen_by(session, p) for p in peers))
            if all(ids - {p.peer_id} <= view for p, view in zip(peers, views, strict=True)):
                return time.monotonic() - start
            await asyncio.sleep(interval_s)
    return float("inf")


@contextlib.asynccontextmanager
async def requester(
    fleet: Fleet,
    manifest: Manifest,
    *,
    peers: int,
    timings: Timings = DEFAULT_TIMINGS,
    coalesce: bool = True,
) -> AsyncIterator[Requester]:
    """An in-process requester of ``fleet``'s swarm, browsing mDNS on loopback only, once
    its table holds ``peers`` usable peers."""
    async with requester_of(
        fleet.swarm, manifest, peers=peers, timings=timings, coalesce=coalesce
    ) as req:
        yield req


@contextlib.asynccontextmanager
async def requester_of(
    swarm: str,
    manifest: Manifest,
    *,
    peers: int,
    timings: Timings = DEFAULT_TIMINGS,
    coalesce: bool = True,
) -> AsyncIterator[Requester]:
    """A requester of ``swarm``, a fleet's or one in another process's hands, browsing
    mDNS on loopback only, once its table holds ``peers`` usable peers; ``coalesce`` is
    ``Requester``'s."""
    table = PeerTable(swarm, timings=timings)
    async with Discovery(table, interfaces=[LOOPBACK], timings=timings):
        await table.wait_for(peers, READY_TIMEOUT_S)
        async with Requester(
            identity=Identity.generate(),
            swarm=swarm,
            table=table,
            manifest=manifest,
            trust=TrustStore.open(),
            reputation=ReputationBook(),
            timings=timings,
            coalesce=coalesce,
        ) as req:
            yield req
