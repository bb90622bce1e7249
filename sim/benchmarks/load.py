"""The load sections: throughput under concurrency, scaling with peers, tails.

Every load loop is bounded by a count of calls; every wait for processes by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import aiohttp
import numpy as np

from sim.benchmarks.bare import BareSwarm
from sim.benchmarks.fleet import (
    BATCH_SIZES,
    HTTP_TIMEOUT_S,
    MODEL_SECONDS,
    Fleet,
    Peer,
    metric_sums,
    process_cpu_seconds,
    seen_by,
    wait_all_see,
)
from sim.benchmarks.loadgen import LoadGens
from sim.benchmarks.measure import (
    THROUGHPUT_BATCH,
    FloatArray,
    Loop,
    classify_loop,
    gc_time,
    patched,
    quantile,
    ratio,
    session,
    summary,
)
from sim.benchmarks.sections import (
    CORES,
    NO_EARLY_EXIT,
    STRAGGLE_PERIODS_S,
    STRAGGLE_S,
    WAVE,
    Plan,
)
from swarm.inference.manifest import Manifest
from swarm.requester.call import DEFAULT_POLICY, Policy
from swarm.requester.requester import Requester

# The throughput section's row of the bare swarm (``sim.benchmarks.bare``).
BARE: Final = "bare_swarm"
# Its row of several requesters in processes of their own (``sim.benchmarks.loadgen``).
REQUESTERS: Final = "batching_on_requesters"
VARIANT_CYCLE: Final = ("V1", "V2", "V3", "V4", "V5")
SEE_TIMEOUT_S: Final = 60.0
TARGET_SEE_S: Final = 3.0


# --- 3. throughput -------------------------------------------------------------------


def batched_floor(manifest: Manifest, chosen: Sequence[str], runs: int) -> dict[str, Any]:
    """Classifications/s of every chosen variant in one process, batch 32, all cores."""
    x = np.zeros((THROUGHPUT_BATCH, 1, 28, 28), np.float32)
    total = 0.0
    for name in chosen:
        times = []
        sess = session(manifest.get(name), threads=CORES)
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, {"input": x})
            times.append((time.perf_counter() - t0) * 1000)
        total += quantile(times, 0.5)
    return {
        "threads": CORES,
        "batch": THROUGHPUT_BATCH,
        "per_s": round(THROUGHPUT_BATCH / total * 1000, 1),
    }


async def throughput(
    tensors: Sequence[FloatArray],
    plan: Plan,
    measure_floor: Callable[[], dict[str, Any]],
    batching: tuple[Requester, Sequence[Peer]],
    unbatched: tuple[Requester, Sequence[Peer]] | None,
    uncoalesced: tuple[Requester, Sequence[Peer]],
    bare: BareSwarm,
    gens: tuple[LoadGens, Sequence[Peer]] | None = None,
) -> dict[str, Any]:
    """classify/s at each concurrency against the floor: micro-batching on and off (the
    peers'), the requester's coalescing of asks into batches off (``uncoalesced``: a
    ``Requester(coalesce=False)`` of the batching peers), every ballot asked at once
    however busy the requester (the default policy waves from ``config.WAVE_IN_FLIGHT``
    calls in flight), and waves of ``WAVE`` at every load; the same load shared among the
    requesters of
    ``gens`` (``REQUESTERS``: processes of their own on the batching peers, as the
    calls of several devices would come; the row is null without them); and the bare
    swarm's calls/s (``sim.benchmarks.bare``: the same models with no protocol around
    them), the most such a swarm sustains here.

    The floor (``measure_floor``) is measured before the first row and again after every
    row; each row is compared with the mean of the two floors around it, so that the
    machine's drift in speed over the section moves both sides of the ratio alike.
    ``floor`` is the first of them; ``vs_section_floor`` compares a row with it.

    The whole table is measured ``plan.throughput_rounds`` times, round after round, so
    that a spell of a slower machine falls on one round of a row rather than on all of
    it. Each row reports its median round (by ``vs_floor``), whole, and lists every
    round's ``vs_floor`` in ``rounds_vs_floor``."""
    floor = previous = measure_floor()
    floors = [floor["per_s"]]
    out: dict[str, Any] = {"floor": floor, "levels": {}}
    modes: tuple[tuple[str, _Row | None], ...] = (
        ("batching_on", _classify_row(tensors, batching, DEFAULT_POLICY)),
        ("batching_off", _classify_row(tensors, unbatched, DEFAULT_POLICY)),
        ("no_coalescing", _classify_row(tensors, uncoalesced, DEFAULT_POLICY)),
        ("batching_on_all_at_once", _classify_row(tensors, batching, Policy(wave=None))),
        (f"batching_on_wave{WAVE}", _classify_row(tensors, batching, Policy(wave=WAVE))),
        (REQUESTERS, None if gens is None else functools.partial(_loadgen_row, *gens)),
        (BARE, functools.partial(_bare_row, tensors, bare)),
    )
    rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(max(1, plan.throughput_rounds)):
        for mode, measure in modes:
            if measure is None:
                continue
            for level in plan.concurrency:
                latencies, wall_s, row = await measure(level, max(plan.per_level, 4 * level))
                rate = len(latencies) / wall_s
                after = measure_floor()
                floors.append(after["per_s"])
                around = (previous["per_s"] + after["per_s"]) / 2
                previous = after
                rounds.setdefault((mode, level), []).append(
                    {
                        "per_s": round(rate, 1),
                        "vs_floor": ratio(rate, around),
                        "floor_per_s": round(around, 1),
                        "vs_section_floor": ratio(rate, floor["per_s"]),
                        "latency_ms": summary(latencies),
                        **row,
                    }
                )
    for mode, measure in modes:
        out["levels"][mode] = {
            str(level): None if measure is None else median_round(rounds[(mode, level)])
            for level in plan.concurrency
        }
    out["floor_per_s_range"] = [min(floors), max(floors)]
    out["requesters"] = 1 if gens is None else gens[0].count
    return out


def median_round(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round of a throughput row whose ``vs_floor`` is the median (the lower one
    of the middle two for an even count), whole, with every round's ratio beside it."""
    ranked = sorted(rows, key=lambda r: r["vs_floor"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds_vs_floor": [r["vs_floor"] for r in rows]}


# One row's measure, given the concurrency and the number of calls: the calls'
# latencies (ms), the wall clock (s), and the row's other figures.
_Row = Callable[[int, int], Awaitable[tuple[list[float], float, dict[str, Any]]]]


def _classify_row(
    tensors: Sequence[FloatArray],
    target: tuple[Requester, Sequence[Peer]] | None,
    policy: Policy,
) -> _Row | None:
    """The measure of classify rows against ``target``'s peers; None without a target."""
    if target is None:
        return None
    req, peers = target

    async def measure(level: int, count: int) -> tuple[list[float], float, dict[str, Any]]:
        async def run() -> Loop:
            return await classify_loop(req, tensors, count=count, concurrency=level, policy=policy)

        return await _against_peers(peers, count, run)

    return measure


async def _loadgen_row(
    gens: LoadGens, peers: Sequence[Peer], level: int, count: int
) -> tuple[list[float], float, dict[str, Any]]:
    """The row of several requesters: their CPU per call summed, and the peers' as in
    ``_classify_row``."""
    requesters = 0

    async def run() -> Loop:
        nonlocal requesters
        shared = await gens.loop(count=count, concurrency=level)
        requesters = shared["requesters"]
        return Loop(
            shared["latencies_ms"],
            shared["wall_s"],
            shared["cpu_s"],
            shared["gc_s"],
            shared["early"],
            shared["failures"],
        )

    latencies, wall_s, row = await _against_peers(peers, count, run)
    return latencies, wall_s, {**row, "requesters": requesters}


async def _against_peers(
    peers: Sequence[Peer], count: int, run: Callable[[], Awaitable[Loop]]
) -> tuple[list[float], float, dict[str, Any]]:
    """``run``'s calls, with the peers' CPU and /metrics read around them: the row of a
    loop of ``count`` calls against ``peers``."""
    pids = [p.proc.pid for p in peers]
    # One read of each peer's /metrics gives its models' seconds and its batch sizes.
    names = (*MODEL_SECONDS, *BATCH_SIZES)
    peers0, metrics0 = _cpu(pids), await metric_sums(peers, names)
    loop = await run()
    peers1, metrics1 = _cpu(pids), await metric_sums(peers, names)
    _, model_cpu, batch_sum, batches = metrics1 - metrics0
    return (
        loop.latencies_ms,
        loop.wall_s,
        {
            "failures": loop.failures,
            "mean_batch": round(batch_sum / batches, 2) if batches > 0 else None,
            "requester_cpu_ms_per_call": _per_call(loop.cpu_s, count),
            "requester_gc_ms_per_call": _per_call(loop.gc_s, count),
            # The peers' CPU, all of it, and of it their models' own (/metrics).
            "peers_cpu_ms_per_call": _per_call(peers1 - peers0, count),
            "models_cpu_ms_per_call": _per_call(float(model_cpu), count),
        },
    )


async def _bare_row(
    tensors: Sequence[FloatArray], bare: BareSwarm, level: int, count: int
) -> tuple[list[float], float, dict[str, Any]]:
    """The bare swarm's row: its workers' CPU in all (their models' not split out)."""
    pids = [p.pid for p in bare.processes]
    cpu0, workers0 = time.process_time(), _cpu(pids)
    with gc_time() as collector:
        latencies, wall_s = await bare.loop(tensors, count=count, concurrency=level)
    return (
        latencies,
        wall_s,
        {
            "failures": 0,  # a failed bare call fails the benchmark
            "mean_batch": None,
            "requester_cpu_ms_per_call": _per_call(time.process_time() - cpu0, count),
            "requester_gc_ms_per_call": _per_call(collector.seconds, count),
            "peers_cpu_ms_per_call": _per_call(_cpu(pids) - workers0, count),
            "models_cpu_ms_per_call": None,
        },
    )


def _cpu(pids: Sequence[int]) -> float:
    return sum(process_cpu_seconds(pid) for pid in pids)


def _per_call(seconds: float, calls: int) -> float:
    return round(seconds * 1000 / max(1, calls), 4)


# --- 4. scaling ----------------------------------------------------------------------


async def scale_to(fleet: Fleet, n: int) -> float:
    """Grow ``fleet`` to ``n`` peers; seconds from the last one ready until all see all."""
    missing = n - len(fleet.peers)
    if missing > 0:
        start = len(fleet.peers)
        await fleet.start([VARIANT_CYCLE[(start + i) % 5] for i in range(missing)])
    return await wait_all_see(fleet.peers, SEE_TIMEOUT_S)


async def join_time(fleet: Fleet, variant: str) -> float:
    """Seconds from a new peer's ready line until every other peer lists it."""
    (peer,) = await fleet.start([variant])
    others = [p for p in fleet.peers if p is not peer]
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while time.monotonic() - peer.ready_at < SEE_TIMEOUT_S:
            views = await asyncio.gather(*(seen_by(http, p) for p in others))
            if all(peer.peer_id in v for v in views):
                return time.monotonic() - peer.ready_at
            await asyncio.sleep(0.05)
    return float("inf")


async def scaling_level(
    fleet: Fleet, req: Requester, tensors: Sequence[FloatArray], n: int, plan: Plan
) -> dict[str, Any]:
    """At ``n`` peers: mutual visibility, requester latency and CPU, a join's time."""
    see_s = await scale_to(fleet, n)
    await req.table.wait_for(n, SEE_TIMEOUT_S)
    loop = await classify_loop(req, tensors, count=plan.scale_runs)
    join_s = await join_time(fleet, VARIANT_CYCLE[n % 5])
    return {
        "peers": n,
        "all_see_all_s": round(see_s, 3),
        "classify_ms": summary(loop.latencies_ms),
        "requester_cpu_ms_per_call": round(loop.cpu_s * 1000 / max(1, plan.scale_runs), 4),
        "join_seen_by_all_s": round(join_s, 3),
        "failures": loop.failures,  # calls that ended without a decision
    }


def scaling_summary(levels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_n = {lv["peers"]: lv for lv in levels}
    first, last = levels[0], levels[-1]
    return {
        "levels": list(levels),
        "p50_last_vs_first": ratio(last["classify_ms"]["p50"], first["classify_ms"]["p50"]),
        "see_within_3s_at_20": (by_n[20]["all_see_all_s"] <= TARGET_SEE_S) if 20 in by_n else None,
    }


# --- 5. tails ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def straggling(peers: Sequence[Peer]) -> AsyncIterator[None]:
    """Pause each of ``peers`` for STRAGGLE_S in every period of its own (bounded)."""

    async def cycle(peer: Peer, period: float) -> None:
        try:
            while True:
                peer.pause()
                await asyncio.sleep(STRAGGLE_S)
                peer.resume()
                await asyncio.sleep(period - STRAGGLE_S)
        finally:
            peer.resume()

    tasks = [
        asyncio.create_task(cycle(p, STRAGGLE_PERIODS_S[i % len(STRAGGLE_PERIODS_S)]))
        for i, p in enumerate(peers)
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


async def tails(
    req: Requester,
    tensors: Sequence[FloatArray],
    stragglers: Sequence[Peer],
    plan: Plan,
    hedge_after_s: float,
) -> dict[str, Any]:
    """p99 with straggling replicas, with and without hedging and early exit."""
    no_hedge = dataclasses.replace(req.timings, hedge_after_s=req.timings.deadline_s)
    hedge = dataclasses.replace(req.timings, hedge_after_s=hedge_after_s)
    configs = {
        "plain": (no_hedge, False),
        "hedging": (hedge, False),
        "early_exit": (no_hedge, True),
        "hedging_and_early_exit": (hedge, True),
    }
    samples: dict[str, list[float]] = {name: [] for name in configs}
    failures = dict.fromkeys(["no_straggler_ms", *configs], 0)  # calls without a decision
    baseline: list[float] = []
    for _ in range(plan.rounds):
        with patched(req, "timings", hedge):
            loop = await classify_loop(req, tensors, count=plan.tail_runs)
        baseline += loop.latencies_ms
        failures["no_straggler_ms"] += loop.failures
        async with straggling(stragglers):
            for name, (timings, early) in configs.items():
                with patched(req, "timings", timings):
                    policy = DEFAULT_POLICY if early else NO_EARLY_EXIT
                    loop = await classify_loop(req, tensors, count=plan.tail_runs, policy=policy)
                samples[name] += loop.latencies_ms
                failures[name] += loop.failures
    return {
        "straggler": {
            "replicas": [p.ready["variant"] for p in stragglers],
            "paused_s": STRAGGLE_S,
            "periods_s": list(STRAGGLE_PERIODS_S),
        },
        "hedge_after_ms": round(hedge_after_s * 1000, 3),
        "no_straggler_ms": summary(baseline),
        **{name: summary(values) for name, values in samples.items()},
        "failures": failures,
    }
