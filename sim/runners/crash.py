"""``crash``: peers SIGKILLed mid-run and restarted; no request may be lost.

The driver streams images at a steady pace (``interval_ms``) while the scenario's faults
happen on schedule. Measured: requests, decisions, clear errors, lost requests (neither:
must be 0), accuracy overall and while degraded, the share decided while at least one
peer was alive, and for each restart the time from the peer's ready line until a
decision first used its reply.
"""

from __future__ import annotations

from typing import Any

from sim.procs import Cluster
from sim.runners.common import Report, start_swarm, stream, summarize, target
from sim.scenario import Fault, Scenario

REUSE_TARGET_S = 5.0
DECIDED_TARGET = 0.99


def alive_at(t: float, peers: int, applied: list[dict[str, Any]]) -> int:
    """How many peers were up at unix time ``t``, from the faults as applied."""
    down: set[str] = set()
    for fault in sorted(applied, key=lambda a: a["t"]):
        if fault["t"] > t:
            break
        if fault["action"] in ("kill", "stop", "pause"):
            down.add(fault["peer"])
        elif fault["action"] in ("restart", "resume"):
            down.discard(fault["peer"])
    return peers - len(down)


def reuse_delays(
    events: list[dict[str, Any]],
    applied: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """For each restart: seconds from the peer's ready line to its first counted reply."""
    out = []
    for fault in applied:
        if fault["action"] != "restart":
            continue
        first = next(
            (
                e["t"]
                for e in events
                if e["t"] >= fault["t"] and fault["peer_id"] in e.get("replies", [])
            ),
            None,
        )
        out.append(
            {
                "peer": fault["peer"],
                "ready_t": fault["t"],
                "used_again_s": None if first is None else round(first - fault["t"], 3),
            }
        )
    return out


async def run_stream(
    cluster: Cluster, scenario: Scenario, faults: tuple[Fault, ...], progress: Any
) -> Report:
    procs, (driver,) = await start_swarm(cluster, scenario)
    cmd = {
        "cmd": "classify",
        "indices": list(range(scenario.images)),
        "rule": "robust",
        "deadline_ms": scenario.deadline_ms,
        "interval_ms": scenario.params.get("interval_ms", 20),
    }
    events, applied, started = await stream(cluster, driver, cmd, faults, progress=progress)
    # Recovery: a stream after the last fault, so a late restart is seen being used.
    tail = int(scenario.params.get("tail_images", 100))
    if tail:
        cmd["indices"] = list(range(tail))
        more, _, _ = await stream(cluster, driver, cmd, progress=progress)
        events += more
    n = len(procs)
    for e in events:
        e["alive"] = alive_at(e["t"], n, applied)
    degraded = [e for e in events if e["alive"] < n]
    some_alive = [e for e in events if e["alive"] >= 1]
    decided_share = (
        sum(1 for e in some_alive if e["pred"] is not None) / len(some_alive) if some_alive else 0.0
    )
    reuse = reuse_delays(events, applied)
    all_row = summarize(events, rule="robust", f=0, attack="none", phase="all")
    results = [
        all_row,
        summarize(
            [e for e in events if e["alive"] == n],
            rule="robust",
            f=0,
            attack="none",
            phase="healthy",
        ),
        summarize(degraded, rule="robust", f=0, attack="none", phase="degraded"),
    ]
    results[0]["decided_while_any_alive"] = round(decided_share, 6)
    results[0]["min_alive"] = min((e["alive"] for e in events), default=n)
    worst = max(
        (r["used_again_s"] if r["used_again_s"] is not None else float("inf") for r in reuse),
        default=0.0,
    )
    targets = [
        target(
            "no request lost",
            all_row["lost"] == 0,
            f"{all_row['answered']} decided + {all_row['errors']} clear errors of "
            f"{all_row['requests']}",
        ),
        target(
            f">= {DECIDED_TARGET:.0%} decided while a peer is alive",
            decided_share >= DECIDED_TARGET,
            f"{decided_share:.4f}",
        ),
    ]
    if reuse:
        targets.append(
            target(
                f"restarted peer used again within {REUSE_TARGET_S:.0f} s",
                worst <= REUSE_TARGET_S,
                f"worst {worst:.3f} s",
            )
        )
    healthy = results[1]["accuracy"]
    timeline = [
        {
            "t": round(e["t"] - started, 3),
            "latency_ms": round(e["latency_ms"], 3),
            "ok": e["pred"] is not None,
            "alive": e["alive"],
        }
        for e in events
    ]
    return Report(
        scenario.name,
        scenario.kind,
        n,
        scenario.images,
        healthy,
        results,
        extra={
            "restarts": reuse,
            "timeline": timeline,
            "faults": [
                {"t_s": round(a["t"] - started, 3), "action": a["action"], "peer": a["peer"]}
                for a in applied
            ],
            "errors_seen": sorted({str(e["error"])[:120] for e in events if e.get("error")})[:10],
        },
        targets=targets,
    )


async def run(cluster: Cluster, scenario: Scenario, progress: Any = None) -> Report:
    return await run_stream(cluster, scenario, scenario.faults, progress)
