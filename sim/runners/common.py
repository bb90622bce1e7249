"""What every runner shares: starting the scenario's swarm, faults on schedule, statistics."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import signal
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

import structlog

from sim.procs import Cluster, Driver, Proc, SimError
from sim.scenario import Fault, PeerSpec, Scenario
from swarm.inference.manifest import load_manifest

log = structlog.get_logger("sim.runners")

MESH_TIMEOUT_S: Final = 60.0
# A stream's time bound: every image may take its deadline, plus room to start.
STREAM_SLACK_S: Final = 60.0
AUTO_BROWSE_S: Final = "3"  # seconds a --variant auto peer looks at the swarm first


def choose_auto(spec: PeerSpec, taken: Sequence[str]) -> str:
    """``--variant auto`` for a simulated device: an uncovered variant first, then the one
    this profile runs fastest (manifest latency x slowdown)."""
    manifest = load_manifest()
    options = sorted(
        manifest.variants,
        key=lambda m: (m.name in taken, m.latency_ms * spec.profile.slowdown, m.name),
    )
    return options[0].name


async def start_swarm(
    cluster: Cluster,
    scenario: Scenario,
    *,
    hedge_after_ms: float = 250.0,
    driver_names: Sequence[str] = ("driver",),
    extra_args: dict[str, list[str]] | None = None,
    hedges: dict[str, float] | None = None,
) -> tuple[dict[str, Proc], list[Driver]]:
    """Start every peer of ``scenario`` and its driver(s); wait for a full mesh."""
    procs: dict[str, Proc] = {}
    taken: list[str] = []
    now, later = [], []
    for spec in scenario.peers:
        variant = spec.variant
        extra: list[str] = list((extra_args or {}).get(spec.name, []))
        if spec.agent and spec.profile.slowdown > 1.0:
            extra += ["--slowdown", str(spec.profile.slowdown)]
        if variant == "auto" and spec.agent:
            variant = choose_auto(spec, [s.variant for s in scenario.peers] + taken)
        start = functools.partial(
            cluster.add_peer,
            spec.name,
            variant,
            agent=spec.agent,
            threads=spec.profile.threads,
            cpus=spec.profile.cpus,
        )
        if variant == "auto":
            # The swarm's own choice: it must see the peers already up, so auto peers
            # start last, one at a time, each browsing for a while first.
            later.append(functools.partial(start, extra=[*extra, "--browse-s", AUTO_BROWSE_S]))
        else:
            taken.append(variant)
            now.append(start(extra=extra))
    for proc in await asyncio.gather(*now):
        procs[proc.name] = proc
    for start_later in later:
        proc = await start_later()
        procs[proc.name] = proc
    drivers = [
        await cluster.add_driver(name, hedge_after_ms=(hedges or {}).get(name, hedge_after_ms))
        for name in driver_names
    ]
    for driver in drivers:
        await driver.wait_peers(len(procs), MESH_TIMEOUT_S)
    log.info("sim_swarm_ready", peers=len(procs), drivers=len(drivers))
    return procs, drivers


async def apply_fault(cluster: Cluster, fault: Fault) -> dict[str, Any]:
    """Do ``fault`` now; returns what happened and when (unix time)."""
    at = time.time()
    match fault.action:
        case "kill":
            await cluster.kill(fault.peer)
        case "stop":
            await cluster.stop(fault.peer)
        case "restart":
            proc = await cluster.restart(fault.peer)
            at = proc.ready_at
        case "pause":
            cluster.signal(fault.peer, signal.SIGSTOP)
        case "resume":
            cluster.signal(fault.peer, signal.SIGCONT)
        case "partition":
            cluster.partition(fault.groups)
        case "heal":
            cluster.heal()
        case other:
            raise SimError(f"unknown fault action {other!r}")
    peer = cluster.procs[fault.peer].peer_id if fault.peer in cluster.procs else ""
    return {
        "action": fault.action,
        "peer": fault.peer,
        "peer_id": peer,
        "t": at,
        "scheduled_s": fault.at_s,
    }


async def stream(
    cluster: Cluster,
    driver: Driver,
    cmd: dict[str, Any],
    faults: Iterable[Fault] = (),
    *,
    progress: Any = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """Run ``cmd`` on the driver while ``faults`` happen on schedule.

    Returns the driver's events, the faults as applied, and the start (unix time).
    """
    events: list[dict[str, Any]] = []
    applied: list[dict[str, Any]] = []
    started = time.time()
    timeout = len(cmd["indices"]) * (cmd.get("deadline_ms", 2000) / 1000 + 0.5) + STREAM_SLACK_S

    async def one(fault: Fault) -> None:
        await asyncio.sleep(max(0.0, started + fault.at_s - time.time()))
        applied.append(await apply_fault(cluster, fault))

    async def schedule() -> None:
        # Each fault on its own clock: a restart that waits for its peer to get ready
        # must not delay the faults after it.
        async with asyncio.TaskGroup() as group:
            for fault in faults:
                group.create_task(one(fault))

    async def read() -> None:
        async for event in driver.events(timeout):
            events.append(event)
            if progress is not None:
                progress.update(1)

    await driver.send(cmd)
    async with asyncio.TaskGroup() as group:
        # Faults still scheduled when the images run out happen all the same: the
        # caller measures recovery with a stream of its own afterwards.
        group.create_task(schedule())
        await read()
    return events, applied, started


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (nearest rank), or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return round(ordered[rank - 1], 3)


def summarize(events: Sequence[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """The common result fields of a run of ``classify`` events."""
    answered = [e for e in events if e.get("pred") is not None]
    errors = [e for e in events if e.get("pred") is None and e.get("error")]
    latencies = [float(e["latency_ms"]) for e in answered]
    correct = sum(1 for e in answered if e["pred"] == e["label"])
    return {
        **fields,
        "accuracy": round(correct / len(events), 6) if events else None,
        "requests": len(events),
        "answered": len(answered),
        "errors": len(errors),
        "lost": len(events) - len(answered) - len(errors),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


@dataclasses.dataclass
class Report:
    """What a runner hands back; ``sim.report`` writes it."""

    scenario: str
    kind: str
    peers: int
    images: int
    clean_accuracy: float | None
    results: list[dict[str, Any]]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    targets: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "kind": self.kind,
            "peers": self.peers,
            "images": self.images,
            "clean_accuracy": self.clean_accuracy,
            "results": self.results,
            "targets": self.targets,
            **self.extra,
        }


def target(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"target": name, "ok": bool(ok), "detail": detail}
