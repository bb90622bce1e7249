"""``straggler``: one peer hung (SIGSTOP) or slowed; what deadlines, hedging and early
exit do to p50 and p99.

Phases, each ``images`` requests through the requester (rule ``robust``):
``baseline``; ``hang`` (the sole replica of its variant, ``hang_peer``, stopped: only
early exit and the deadline bound the wait); ``hang-replicated`` (the replica the
requester used most, stopped: hedging to the other replica), once with hedging after
250 ms and once with a second requester that never hedges; ``delay`` (``hang_peer``
answers ``delay_ms`` late). ``no-early-exit`` rows use the gather path, which waits for
every peer up to the deadline, on ``no_early_exit_images`` images.
"""

from __future__ import annotations

import signal
from collections import Counter
from typing import Any

from sim import control
from sim.procs import Cluster, Driver
from sim.runners.common import Report, start_swarm, stream, summarize, target
from sim.scenario import Scenario

P50_RISE_LIMIT = 0.20
# The driver times a call from outside the requester, on a busy machine: a call that
# ends at its deadline is seen a few milliseconds later.
DEADLINE_SLACK = 0.02


async def _phase(
    cluster: Cluster, driver: Driver, scenario: Scenario, phase: str, progress: Any, **fields: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cmd = {
        "cmd": "classify",
        "indices": list(range(scenario.images)),
        "rule": "robust",
        "deadline_ms": scenario.deadline_ms,
    }
    events, _, _ = await stream(cluster, driver, cmd, progress=progress)
    row = summarize(
        events,
        rule="robust",
        f=0,
        attack="none",
        phase=phase,
        deadline_ms=scenario.deadline_ms,
        **fields,
    )
    row["early_exits"] = sum(1 for e in events if e.get("skipped"))
    row["missing"] = sum(len(e.get("missing", [])) for e in events)
    return row, events


async def _gather_phase(
    cluster: Cluster, driver: Driver, scenario: Scenario, phase: str, images: int
) -> dict[str, Any]:
    cmd = {"cmd": "gather", "indices": list(range(images)), "deadline_ms": scenario.deadline_ms}
    events, _, _ = await stream(cluster, driver, cmd)
    for e in events:
        e["pred"] = e["preds"]["robust"]
        e["error"] = None if e["pred"] is not None else "no ballots"
    return summarize(
        events,
        rule="robust",
        f=0,
        attack="none",
        phase=phase,
        deadline_ms=scenario.deadline_ms,
        hedging=False,
        early_exit=False,
    )


async def run(cluster: Cluster, scenario: Scenario, progress: Any = None) -> Report:
    params = scenario.params
    # The second requester never hedges: its hedge delay is past the deadline.
    procs, (driver, nohedge) = await start_swarm(
        cluster,
        scenario,
        driver_names=("driver", "driver-nohedge"),
        hedges={"driver-nohedge": scenario.deadline_ms * 10.0},
    )
    hang = str(params.get("hang_peer", "p0"))
    if progress is not None:
        progress.reset(total=scenario.images * 5)
    results = []
    # Warm-up, not measured: the requester's latency estimates start from the manifest.
    await stream(
        cluster,
        driver,
        {
            "cmd": "classify",
            "indices": list(range(20)),
            "rule": "robust",
            "deadline_ms": scenario.deadline_ms,
        },
    )
    base, base_events = await _phase(
        cluster, driver, scenario, "baseline", progress, hedging=True, early_exit=True
    )
    results.append(base)
    cluster.signal(hang, signal.SIGSTOP)
    try:
        row, _ = await _phase(
            cluster, driver, scenario, "hang", progress, hung=hang, hedging=True, early_exit=True
        )
        results.append(row)
        ne = int(params.get("no_early_exit_images", 20))
        if ne:
            results.append(
                await _gather_phase(cluster, driver, scenario, "hang, no-early-exit", ne)
            )
    finally:
        cluster.signal(hang, signal.SIGCONT)
    used = Counter(p for e in base_events for p in e.get("replies", []))
    variant_of = {p.name: p.ready.get("variant") for p in procs.values()}
    replicated = [n for n, v in variant_of.items() if list(variant_of.values()).count(v) > 1]
    if replicated:
        victim = max(replicated, key=lambda n: used.get(procs[n].peer_id, 0))
        cluster.signal(victim, signal.SIGSTOP)
        try:
            row, _ = await _phase(
                cluster,
                driver,
                scenario,
                "hang-replicated",
                progress,
                hung=victim,
                hedging=True,
                early_exit=True,
            )
            results.append(row)
            row, _ = await _phase(
                cluster,
                nohedge,
                scenario,
                "hang-replicated, no-hedge",
                progress,
                hung=victim,
                hedging=False,
                early_exit=True,
            )
            results.append(row)
        finally:
            cluster.signal(victim, signal.SIGCONT)
    proc = procs[hang]
    if proc.control is not None:
        delay = float(params.get("delay_ms", 400))
        await control.set_mode(proc.control, delay_ms=delay)
        try:
            row, _ = await _phase(
                cluster,
                driver,
                scenario,
                "delay",
                progress,
                slowed=hang,
                delay_ms=delay,
                hedging=True,
                early_exit=True,
            )
            results.append(row)
        finally:
            await control.set_mode(proc.control, delay_ms=0.0)
    hung = next(r for r in results if r["phase"] == "hang")
    targets = []
    if base["p50_ms"] and hung["p50_ms"] is not None and hung["p99_ms"] is not None:
        rise = hung["p50_ms"] / base["p50_ms"] - 1
        targets = [
            target(
                f"one peer hung: p99 within the deadline (+{DEADLINE_SLACK:.0%} for "
                "process scheduling)",
                hung["p99_ms"] <= scenario.deadline_ms * (1 + DEADLINE_SLACK),
                f"p99 {hung['p99_ms']:.1f} ms, deadline {scenario.deadline_ms} ms",
            ),
            target(
                f"one peer hung: p50 rises < {P50_RISE_LIMIT:.0%}",
                rise < P50_RISE_LIMIT,
                f"p50 {base['p50_ms']:.1f} -> {hung['p50_ms']:.1f} ms ({rise:+.1%})",
            ),
        ]
    return Report(
        scenario.name,
        scenario.kind,
        len(procs),
        scenario.images,
        base["accuracy"],
        results,
        extra={"variants": variant_of},
        targets=targets,
    )
