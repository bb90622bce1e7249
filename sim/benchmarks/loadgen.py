"""Requesters in processes of their own, for the throughput rows of several requesters.

One Python requester drives at most about one call per millisecond of its own CPU,
whatever the peers could serve: on a machine with many cores it, not the swarm, is
the limit. In the swarm every device may ask, so the calls of many clients spread over
several requesters. ``LoadGens`` starts ``python -m sim.benchmarks.loadgen`` processes
that join the fleet's swarm (mDNS on 127.0.0.1 only) and shares each load among them.

A process speaks JSON lines: it prints ``{"event": "ready"}`` once its requester sees
the peers and its connections are open, then answers each command line
``{"count": N, "concurrency": C}`` on stdin with one result line (its calls' latencies,
its wall clock and CPU, the calls that skipped a peer and those that failed), or
``{"error": ...}`` for a command it cannot run. It exits at the end of stdin. Every wait
is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from sim.benchmarks.fleet import READY_TIMEOUT_S, STOP_TIMEOUT_S, BenchError, requester_of
from sim.benchmarks.measure import classify_loop, inputs
from swarm import aio
from swarm.errors import SwarmError
from swarm.inference.manifest import default_manifest_path, load_manifest
from swarm.log import configure_logging
from swarm.resource import AsyncResource

# A load's calls, however many, end within this: each call has its own deadline.
RESULT_TIMEOUT_S: Final = 300.0
WARM_CALLS: Final = 20
INPUTS: Final = 256
# A result line holds every call's latency: room for some 100,000 of them.
LINE_LIMIT: Final = 4 * 1024 * 1024


def split(total: int, parts: int) -> list[int]:
    """``total`` shared among ``parts`` as evenly as integers go, the larger shares first."""
    if parts < 1 or total < 0:
        raise ValueError(f"cannot split {total} among {parts}")
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _command(line: bytes) -> tuple[int, int]:
    """A command line's count and concurrency; ``ValueError`` saying what is wrong."""
    try:
        command = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"a command is one JSON object per line: {exc}") from exc
    if not isinstance(command, dict):
        raise ValueError(  # noqa: TRY004  # one error type for every bad line, said back
            "a command is a JSON object with 'count' and 'concurrency'"
        )
    count, concurrency = command.get("count"), command.get("concurrency")
    if type(count) is not int or count < 0:
        raise ValueError(f"'count' must be an integer >= 0, got {count!r}")
    if type(concurrency) is not int or concurrency < 1:
        raise ValueError(f"'concurrency' must be an integer >= 1, got {concurrency!r}")
    return count, concurrency


async def serve(swarm: str, peers: int) -> None:
    """Join ``swarm``, say ready, then run each command on stdin until it ends."""
    manifest = load_manifest(default_manifest_path())
    tensors = inputs(INPUTS)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    def say(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async with requester_of(swarm, manifest, peers=peers) as req:
        await classify_loop(req, tensors, count=WARM_CALLS)  # connections open, caches warm
        say({"event": "ready"})
        while line := await stdin.readline():
            try:
                count, concurrency = _command(line)
            except ValueError as exc:
                say({"error": str(exc)})
                continue
            run = await classify_loop(req, tensors, count=count, concurrency=concurrency)
            say(
                {
                    "latencies_ms": [round(ms, 4) for ms in run.latencies_ms],
                    "failures": run.failures,
                    "early": run.early,
                    "wall_s": run.wall_s,
                    "cpu_s": run.cpu_s,
                    "gc_s": run.gc_s,
                }
            )


class LoadGens(AsyncResource):
    """``count`` loadgen processes on ``swarm``'s peers, stopped on exit whatever happened."""

    def __init__(self, swarm: str, count: int, workdir: Path, *, peers: int) -> None:
        if count < 1:
            raise ValueError(f"LoadGens needs at least one process, got {count}")
        self.swarm = swarm
        self.count = count
        self.workdir = workdir
        self.peers = peers
        self.processes: list[asyncio.subprocess.Process] = []
        self._stderr: list[Path] = []

    async def start(self) -> None:
        """Start every process and wait until each is ready; stop them all if one fails."""
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise

    async def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(self.count):
            stderr = self.workdir / f"{self.swarm}-loadgen{i}.stderr"
            with stderr.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "sim.benchmarks.loadgen", "--swarm", self.swarm),
                    *("--peers", str(self.peers)),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    limit=LINE_LIMIT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            self.processes.append(proc)
            self._stderr.append(stderr)
        ready = await asyncio.gather(*(self._line(i, READY_TIMEOUT_S) for i in range(self.count)))
        for i, message in enumerate(ready):
            if message.get("event") != "ready":
                raise BenchError(f"loadgen {i} said {message!r} instead of ready")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    async def loop(self, *, count: int, concurrency: int) -> dict[str, Any]:
        """``count`` calls, ``concurrency`` at a time in all, shared among the processes
        (a process with no share of the concurrency sits out). The wall clock is this
        side's, from the first command sent to the last result read; the CPU and the
        garbage collector's time are the processes' own, summed."""
        shares = [c for c in split(concurrency, self.count) if c > 0]
        counts = [count * c // concurrency for c in shares]
        counts[0] += count - sum(counts)
        start = time.perf_counter()
        for proc, n, c in zip(self.processes, counts, shares, strict=False):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"count": n, "concurrency": c}).encode() + b"\n")
        results = await asyncio.gather(
            *(self._line(i, RESULT_TIMEOUT_S) for i in range(len(shares)))
        )
        wall_s = time.perf_counter() - start
        for i, result in enumerate(results):
            if "error" in result or "latencies_ms" not in result:
                raise BenchError(f"loadgen {i} could not run its load: {result!r}")
        return {
            "latencies_ms": [ms for r in results for ms in r["latencies_ms"]],
            "failures": sum(int(r["failures"]) for r in results),
            "early": sum(int(r["early"]) for r in results),
            "wall_s": wall_s,
            "cpu_s": sum(float(r["cpu_s"]) for r in results),
            "gc_s": sum(float(r["gc_s"]) for r in results),
            "requesters": len(shares),
        }

    async def _line(self, i: int, timeout_s: float) -> dict[str, Any]:
        stdout = self.processes[i].stdout
        assert stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                line = await stdout.readline()
        except TimeoutError:
            raise BenchError(f"loadgen {i} said nothing within {timeout_s:.0f} s") from None
        if not line:
            err = self._stderr[i].read_text(errors="replace")[-2000:]
            raise BenchError(f"loadgen {i} exited: {err}")
        try:
            message = json.loads(line)
        except ValueError:
            raise BenchError(f"loadgen {i} wrote a line that is not JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise BenchError(f"loadgen {i} wrote {message!r}, not a JSON object")
        return message

    async def aclose(self) -> None:
        """End each process's stdin, then SIGKILL what has not exited in time; idempotent."""
        for proc in self.processes:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in self.processes:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.benchmarks.loadgen", description=__doc__)
    parser.add_argument("--swarm", required=True, help="the swarm to join (its peers' --swarm)")
    parser.add_argument("--peers", type=int, default=5, help="peers to see before ready")
    args = parser.parse_args(argv)
    if args.peers < 1:
        parser.error(f"--peers must be >= 1, got {args.peers}")
    configure_logging("json", "warning")
    aio.serving_gc()
    try:
        aio.run(serve(args.swarm, args.peers))
    except SwarmError as exc:  # no peers seen in time, say: said, not a traceback
        sys.stderr.write(f"loadgen: error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
