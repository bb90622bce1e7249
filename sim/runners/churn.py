"""``churn``: peers leave (SIGTERM: a goodbye on mDNS) and come back, continuously.

Every ``period_s`` seconds the next peer in turn leaves, and rejoins half a period later,
while the driver streams images at ``interval_ms``. Reported like ``crash``.
"""

from __future__ import annotations

from typing import Any

from sim.procs import Cluster
from sim.runners.common import Report
from sim.runners.crash import run_stream
from sim.scenario import Fault, Scenario


def schedule(peers: list[str], period_s: float, duration_s: float) -> tuple[Fault, ...]:
    faults = []
    k = 0
    while (k + 1) * period_s < duration_s:
        name = peers[k % len(peers)]
        faults += [
            Fault((k + 0.5) * period_s, "stop", name),
            Fault((k + 1) * period_s, "restart", name),
        ]
        k += 1
    return tuple(faults)


async def run(cluster: Cluster, scenario: Scenario, progress: Any = None) -> Report:
    interval_s = float(scenario.params.get("interval_ms", 20)) / 1000
    # The stream lasts at least images x interval; leave the last period without faults.
    duration = scenario.images * interval_s
    faults = scenario.faults or schedule(
        [p.name for p in scenario.peers],
        float(scenario.params.get("period_s", 1.5)),
        duration - 1.0,
    )
    return await run_stream(cluster, scenario, faults, progress)
