"""``partition``: the bridge split in two; each side keeps answering; then healed.

Needs network namespaces. One requester (driver) per side. Phases, each ``images``
requests per driver: ``before``, ``partitioned`` (``groups``, each driver joining the
group of its index), ``healed`` (after ``Lab.heal``). Reported per side: decisions,
errors, accuracy, and which variants answered.
"""

from __future__ import annotations

import time
from typing import Any

from sim.procs import Cluster, SimError
from sim.runners.common import Report, start_swarm, stream, summarize, target
from sim.scenario import Scenario

# After healing, how long the requesters get to see every peer as a candidate again.
HEAL_WAIT_S = 10.0


async def run(cluster: Cluster, scenario: Scenario, progress: Any = None) -> Report:
    if cluster.lab is None:
        raise SimError("the partition scenario needs network namespaces: run it as root")
    groups = [list(g) for g in scenario.params.get("groups", [])]
    if len(groups) != 2:
        raise SimError("partition: params.groups must hold two lists of peer names")
    procs, drivers = await start_swarm(cluster, scenario, driver_names=("driverA", "driverB"))
    variant_of = {p.peer_id: str(p.ready.get("variant")) for p in procs.values()}
    if progress is not None:
        progress.reset(total=scenario.images * 6)
    results = []
    heal_s: float | None = None
    heal_error = ""
    for phase in ("before", "partitioned", "healed"):
        if phase == "partitioned":
            cluster.partition([groups[0] + ["driverA"], groups[1] + ["driverB"]])
        elif phase == "healed":
            cluster.heal()
            started = time.monotonic()
            try:
                for driver in drivers:
                    await driver.wait_peers(len(procs), HEAL_WAIT_S)
                heal_s = round(time.monotonic() - started, 3)
            except (SimError, TimeoutError) as exc:
                heal_s = None
                heal_error = str(exc)[:800]
        for side, driver in zip("AB", drivers, strict=True):
            cmd = {
                "cmd": "classify",
                "indices": list(range(scenario.images)),
                "rule": "robust",
                "deadline_ms": scenario.deadline_ms,
            }
            events, _, _ = await stream(cluster, driver, cmd, progress=progress)
            row = summarize(events, rule="robust", f=0, attack="none", phase=phase, side=side)
            used = sorted({variant_of.get(p, "?") for e in events for p in e.get("replies", [])})
            row["variants_used"] = "+".join(used)
            results.append(row)
    parted = [r for r in results if r["phase"] == "partitioned"]
    healed = [r for r in results if r["phase"] == "healed"]
    all_variants = "+".join(sorted(set(variant_of.values())))
    before = next(r for r in results if r["phase"] == "before")
    targets = [
        target(
            "each side keeps answering while partitioned",
            all(r["answered"] >= 0.99 * r["requests"] for r in parted),
            ", ".join(f"{r['side']}: {r['answered']}/{r['requests']}" for r in parted),
        ),
        target(
            "after healing, each side uses every variant again",
            all(r["variants_used"] == all_variants for r in healed),
            ", ".join(f"{r['side']}: {r['variants_used']}" for r in healed)
            + (
                f"; every peer a candidate again after {heal_s} s"
                if heal_s is not None
                else f"; not every peer a candidate again within {HEAL_WAIT_S} s: {heal_error}"
            ),
        ),
    ]
    return Report(
        scenario.name,
        scenario.kind,
        len(procs),
        scenario.images,
        before["accuracy"],
        results,
        extra={"heal_s": heal_s, "heal_error": heal_error},
        targets=targets,
    )
