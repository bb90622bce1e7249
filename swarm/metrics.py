"""Prometheus metrics of one peer, served at GET /metrics.

Each peer owns a ``Metrics`` with its own ``CollectorRegistry`` rather than the
process-global one, so the simulator and the tests can run several peers in one process
without their series colliding.

Label values are always drawn from small fixed sets (route names, HTTP status codes,
``VerificationError.reason`` tokens, vote rule names): never from peer-supplied text,
which would let a hostile peer grow the registry without bound.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

NAMESPACE: Final = "vswarm"

# Seconds. One variant runs in well under a millisecond to tens of milliseconds on an
# edge CPU; a classify call spans a network round trip up to the deadline (2 s).
_INFERENCE_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
_CLASSIFY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# Powers of two up to twice the default Timings.max_batch.
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The series one peer exports, registered on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "requests",
            "HTTP requests served, by route and status code.",
            ["endpoint", "status"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "inference_seconds",
            "Time the local model took to run one batch.",
            namespace=NAMESPACE,
            buckets=_INFERENCE_BUCKETS,
            registry=r,
        )
        self.inference_cpu_seconds = Counter(
            "inference_cpu_seconds",
            "CPU time the local model's runs took (with one ONNX Runtime thread, all of it;"
            " less than inference_seconds when a run waited for a core).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.batch_size = Histogram(
            "batch_size",
            "Inputs run together in one batch of the local model.",
            namespace=NAMESPACE,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.classify_seconds = Histogram(
            "classify_seconds",
            "Time from receiving a classify call to its decision.",
            namespace=NAMESPACE,
            buckets=_CLASSIFY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "rejections",
            "Requests or replies refused, by reason token.",
            ["reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.votes = Counter(
            "votes",
            "Decisions taken, by aggregation rule.",
            ["rule"],
            namespace=NAMESPACE,
            registry=r,
        )
        self._request_children: dict[tuple[str, int], Counter] = {}
        self.peers = Gauge(
            "peers",
            "Peers in the live peer table, by state.",
            ["state"],
            namespace=NAMESPACE,
            registry=r,
        )

    def observe_request(self, endpoint: str, status: int) -> None:
        """Count one served HTTP request."""
        # The labelled child is looked up once per (route, status): labels() validates
        # and locks on every call. Both come from small fixed sets, so the dict stays small.
        child = self._request_children.get((endpoint, status))
        if child is None:
            child = self.requests.labels(endpoint=endpoint, status=str(status))
            self._request_children[(endpoint, status)] = child
        child.inc()

    def observe_batch(self, size: int, seconds: float, cpu_seconds: float | None = None) -> None:
        """Record one run of the local model over ``size`` inputs: ``seconds`` of wall
        clock, ``cpu_seconds`` of CPU when known."""
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)
        if cpu_seconds is not None:
            self.inference_cpu_seconds.inc(max(0.0, cpu_seconds))

    def observe_classify(self, seconds: float, rule: str) -> None:
        """Record one classify decision and the rule that took it."""
        self.classify_seconds.observe(seconds)
        self.votes.labels(rule=rule).inc()

    def observe_rejection(self, reason: str) -> None:
        """Count one refused request or reply (``reason`` is a stable token)."""
        self.rejections.labels(reason=reason).inc()

    def set_peer_counts(self, *, usable: int, suspected: int, total: int) -> None:
        """Publish the size of the peer table (wire this to a PeerTable listener)."""
        self.peers.labels(state="usable").set(usable)
        self.peers.labels(state="suspected").set(suspected)
        self.peers.labels(state="total").set(total)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format, and the content type to serve it with."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
