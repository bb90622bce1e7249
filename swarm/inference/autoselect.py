"""``--variant auto``: choose the variant that adds the most to the swarm as it is now.

A peer started with ``--variant auto`` browses the swarm for a short, bounded while and,
meanwhile, measures how fast this device runs each variant. It then picks, by
``choose_variant`` (pure, so it is tested on hand-made options):

1. an *uncovered* variant, one no live peer serves yet: the most accurate of those that
   meet the latency budget. Variant Parallelism gains accuracy from distinct variants
   (Asadi & Goudarzi 2023), so a missing one adds more than another replica;
2. if every variant that fits is covered, the one with the fewest live replicas, then the
   most accurate: replicas of a scarce variant are what hedging and crash tolerance need;
3. if no variant meets the budget, the fastest one: the device still helps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Final, Literal

import numpy as np

from swarm import config
from swarm.discovery.table import PeerTable
from swarm.errors import ConfigError
from swarm.inference.engine import Engine
from swarm.inference.manifest import Manifest, ModelSpec
from swarm.log import get_logger

log = get_logger(__name__)

Reason = Literal["uncovered", "fewest_replicas", "over_budget_fastest"]

# A few dozen timed runs after a few untimed ones (ONNX Runtime allocates and tunes on
# its first runs); the median ignores the odd scheduling hiccup.
DEFAULT_RUNS: Final = 30
WARMUP_RUNS: Final = 3
DEFAULT_BROWSE_S: Final = 3.0
MAX_BROWSE_S: Final = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class VariantOption:
    """One variant as the choice sees it."""

    name: str
    accuracy: float  # validation accuracy from the manifest
    latency_ms: float  # measured on this device, one input
    replicas: int  # live peers in the swarm serving it


@dataclasses.dataclass(frozen=True, slots=True)
class Choice:
    """The chosen variant and why."""

    name: str
    reason: Reason
    latency_ms: float
    replicas: int


def choose_variant(options: Sequence[VariantOption], *, latency_budget_ms: float | None) -> Choice:
    """The variant that adds the most to the swarm (see the module docstring)."""
    if not options:
        raise ConfigError("the manifest lists no variant to choose from")
    fits = [o for o in options if latency_budget_ms is None or o.latency_ms <= latency_budget_ms]
    if not fits:
        # Fastest first; among equally fast ones the scarcer, then the more accurate.
        best = min(options, key=lambda o: (o.latency_ms, o.replicas, -o.accuracy, o.name))
        return Choice(best.name, "over_budget_fastest", best.latency_ms, best.replicas)
    uncovered = [o for o in fits if o.replicas == 0]
    if uncovered:
        best = max(uncovered, key=lambda o: (o.accuracy, -o.latency_ms, _desc(o.name)))
        return Choice(best.name, "uncovered", best.latency_ms, best.replicas)
    best = min(fits, key=lambda o: (o.replicas, -o.accuracy, o.latency_ms, o.name))
    return Choice(best.name, "fewest_replicas", best.latency_ms, best.replicas)


def _desc(name: str) -> tuple[int, ...]:
    # max() with a name tie-break that prefers the alphabetically first name.
    return tuple(-ord(c) for c in name)


def replica_counts(
    table: PeerTable, names: Iterable[str], family: str | None = None
) -> dict[str, int]:
    """How many usable peers of the table serve each of ``names`` (of ``family``)."""
    served = Counter(r.variant for r in table.candidates() if family is None or r.family == family)
    return {name: served.get(name, 0) for name in names}


async def measure_latency(
    spec: ModelSpec,
    *,
    threads: int,
    runs: int = DEFAULT_RUNS,
    timings: config.Timings = config.DEFAULT_TIMINGS,
    input_shape: tuple[int, int, int] = config.INPUT_SHAPE,
    num_classes: int = config.NUM_CLASSES,
) -> float:
    """Median milliseconds this device takes to run ``spec`` on one input."""
    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    x = np.random.default_rng(0).random(input_shape, dtype=np.float32)
    samples: list[float] = []
    engine = Engine(
        spec,
        threads=threads,
        timings=timings,
        batching=False,
        input_shape=input_shape,
        num_classes=num_classes,
    )
    async with engine:
        for i in range(WARMUP_RUNS + runs):
            result = await engine.infer(x)
            if i >= WARMUP_RUNS:
                samples.append(result.seconds * 1000.0)
    return statistics.median(samples)


async def measure_all(
    specs: Sequence[ModelSpec],
    *,
    threads: int,
    runs: int = DEFAULT_RUNS,
    timings: config.Timings = config.DEFAULT_TIMINGS,
    input_shape: tuple[int, int, int] = config.INPUT_SHAPE,
    num_classes: int = config.NUM_CLASSES,
) -> dict[str, float]:
    """``measure_latency`` of each spec, one after another so they do not compete."""
    latencies: dict[str, float] = {}
    for spec in specs:
        latencies[spec.name] = await measure_latency(
            spec,
            threads=threads,
            runs=runs,
            timings=timings,
            input_shape=input_shape,
            num_classes=num_classes,
        )
        log.debug("variant_measured", variant=spec.name, latency_ms=latencies[spec.name])
    return latencies


async def auto_select(
    manifest: Manifest,
    table: PeerTable,
    *,
    threads: int,
    latency_budget_ms: float | None,
    browse_s: float = DEFAULT_BROWSE_S,
    runs: int = DEFAULT_RUNS,
    timings: config.Timings = config.DEFAULT_TIMINGS,
) -> Choice:
    """Measure every variant while ``table`` fills for ``browse_s`` seconds, then choose.

    The caller must already be browsing into ``table`` (and not yet announcing itself).
    """
    if not 0.0 <= browse_s <= MAX_BROWSE_S:
        raise ConfigError(f"the browse time must be in [0, {MAX_BROWSE_S}] s, got {browse_s}")
    specs = manifest.variants
    if not specs:
        raise ConfigError(f"the manifest {manifest.path} lists no model of role 'variant'")
    loop = asyncio.get_running_loop()
    browse_until = loop.time() + browse_s
    latencies = await measure_all(
        specs,
        threads=threads,
        runs=runs,
        timings=timings,
        input_shape=manifest.input.shape,
        num_classes=manifest.num_classes,
    )
    # Measuring overlaps the browse window; wait out what is left of it.
    await asyncio.sleep(max(0.0, browse_until - loop.time()))
    replicas = replica_counts(table, (s.name for s in specs), manifest.family_id)
    options = [
        VariantOption(s.name, s.val_accuracy, latencies[s.name], replicas[s.name]) for s in specs
    ]
    choice = choose_variant(options, latency_budget_ms=latency_budget_ms)
    log.info(
        "variant_auto_selected",
        variant=choice.name,
        reason=choice.reason,
        latency_ms=round(choice.latency_ms, 4),
        replicas=choice.replicas,
        latency_budget_ms=latency_budget_ms,
        options={
            o.name: {
                "accuracy": o.accuracy,
                "latency_ms": round(o.latency_ms, 4),
                "replicas": o.replicas,
            }
            for o in options
        },
    )
    return choice
