"""What the page shows, as JSON: this peer, the swarm as it sees it, and its own numbers.

Read-only views of objects the peer already has (the peer table, the reputation book,
the requester's latency estimates, the metrics registry, the decision feed). Only public
keys and ids go out: ``PageSources`` is given no ``Identity``, so nothing here can reach
a private or session key.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from prometheus_client.metrics import MetricWrapperBase

from swarm.decision.reputation import ReputationBook
from swarm.discovery.table import PeerRecord, PeerTable
from swarm.inference.manifest import Manifest, ModelSpec
from swarm.metrics import Metrics
from swarm.requester.events import DecisionFeed

PAGE_TICK_S: Final = 1.0  # how often a live view gets the peer table and numbers

# A peer's state on the page, worst first when several apply.
SUSPECTED: Final = "suspected"  # failed config.Timings.suspect_after_failures calls in a row
EXCLUDED: Final = "excluded"  # its reputation weight is 0: its ballots count for nothing
BACKING_OFF: Final = "backing off"  # a call failed lately; not asked until its backoff ends
FAILING: Final = "failing"  # its last calls failed; asked again, suspected if the next fail too
HEALTHY: Final = "healthy"
REQUESTER: Final = "requester"  # announces no model; only asks


@dataclasses.dataclass(frozen=True, slots=True)
class PageSources:
    """What the page reads; the peer builds it once at startup."""

    peer_id: str
    public_key: str  # base64, as /v1/info shows it
    swarm: str
    manifest: Manifest
    spec: ModelSpec  # the variant this peer serves
    table: PeerTable
    reputation: ReputationBook
    metrics: Metrics
    feed: DecisionFeed
    latency_ms: Callable[[str], float | None]  # the requester's round-trip estimate
    tick_s: float = PAGE_TICK_S
    clock: Callable[[], float] = time.monotonic  # the peer table's clock


def self_view(src: PageSources) -> dict[str, Any]:
    """This peer: who it is and what it serves, and the class names of its family."""
    return {
        "peer_id": src.peer_id,
        "public_key": src.public_key,
        "swarm": src.swarm,
        "variant": src.spec.name,
        "family": src.manifest.family_id,
        "model_sha256": src.spec.sha256,
        "classes": list(src.manifest.class_names),
        "variants": [s.name for s in src.manifest.variants],
    }


def peer_state(record: PeerRecord, weight: float, now: float) -> str:
    """One of SUSPECTED, EXCLUDED, BACKING_OFF, FAILING, HEALTHY, REQUESTER."""
    if record.role != "peer":
        return REQUESTER
    if record.suspected:
        return SUSPECTED
    if weight == 0.0:
        return EXCLUDED
    if not record.usable(now):
        return BACKING_OFF
    if record.failures:
        return FAILING
    return HEALTHY


def peers_view(src: PageSources) -> list[dict[str, Any]]:
    """Every peer of the table (this one included), by variant then id."""
    now = src.clock()
    standing = {r.peer_id: r for r in src.reputation.snapshot()}
    weights = src.reputation.weights(r.peer_id for r in src.table.records())
    ours = {s.sha256 for s in src.manifest.models}
    out = []
    for record in src.table.records():
        rep = standing.get(record.peer_id)
        weight = weights[record.peer_id]
        address = record.addresses[0] if record.addresses else ""
        out.append(
            {
                "peer_id": record.peer_id,
                "public_key": base64.b64encode(record.public_key).decode("ascii"),
                "self": record.peer_id == src.peer_id,
                "variant": record.variant,
                "role": record.role,
                # A family is named by its models' hashes; a peer whose model is not in
                # ours belongs to another one, which this peer cannot name.
                "family": src.manifest.family_id if record.model_sha256 in ours else None,
                "address": f"{address}:{record.port}",
                "latency_ms": _round(src.latency_ms(record.peer_id)),
                "reputation": None if rep is None else round(rep.score, 4),
                "observations": 0.0 if rep is None else round(rep.observations, 1),
                "weight": round(weight, 4),
                "state": peer_state(record, weight, now),
                "failures": record.failures,
                "seen_s_ago": round(max(0.0, now - record.last_seen), 1),
            }
        )
    out.sort(key=lambda p: (p["variant"], p["peer_id"]))
    return out


def stats_view(src: PageSources) -> dict[str, Any]:
    """This peer's own numbers since it started, from its metrics registry."""
    m = src.metrics
    requests: dict[str, int] = {}
    errors: dict[str, int] = {}
    for labels, value in _values(m.requests, "_total"):
        route = labels.get("endpoint", "?")
        requests[route] = requests.get(route, 0) + int(value)
        if int(labels.get("status", "0")) >= 400:
            key = f"{route} {labels.get('status')}"
            errors[key] = errors.get(key, 0) + int(value)
    batches = _histogram(m.batch_size)
    return {
        "requests": requests,
        "errors": errors,
        "rejections": {labels.get("reason", "?"): int(v) for labels, v in _values(m.rejections)},
        "batches": {
            "count": batches.count,
            "inputs": int(batches.total),
            "mean": round(batches.total / batches.count, 2) if batches.count else None,
            "sizes": [[_le(le), n] for le, n in batches.per_bucket()],
        },
        "model_ms": _quantiles(_histogram(m.inference_seconds)),
        "classify_ms": _quantiles(_histogram(m.classify_seconds)),
        "decisions": src.feed.decided_count,
        "no_decision": src.feed.failed_count,
    }


@dataclasses.dataclass(frozen=True, slots=True)
class _Histogram:
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count)
    count: int
    total: float

    def per_bucket(self) -> Iterable[tuple[float, int]]:
        previous = 0.0
        for le, cumulative in self.buckets:
            yield le, int(cumulative - previous)
            previous = cumulative

    def quantile(self, q: float) -> float | None:
        """As Prometheus's histogram_quantile: linear within the bucket holding rank q."""
        if self.count == 0:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(le):
                    return lower  # beyond the last bound: the last bound is all we know
                inside = cumulative - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = le, cumulative
        return lower


def _values(
    metric: MetricWrapperBase, suffix: str = "_total"
) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(s.labels), s.value)
        for family in metric.collect()
        for s in family.samples
        if s.name.endswith(suffix)
    ]


def _histogram(metric: MetricWrapperBase) -> _Histogram:
    buckets: list[tuple[float, float]] = []
    count, total = 0, 0.0
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                count = int(s.value)
            elif s.name.endswith("_sum"):
                total = s.value
    return _Histogram(tuple(sorted(buckets)), count, total)


def _quantiles(h: _Histogram) -> dict[str, Any]:
    def ms(q: float) -> float | None:
        value = h.quantile(q)
        return None if value is None else round(value * 1000, 3)

    return {"count": h.count, "p50": ms(0.5), "p99": ms(0.99)}


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else f"{bound:g}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
