"""Constants and tunables of the swarm, in one place, with their units.

Timing values are grouped in ``Timings`` so tests and the simulator shrink them instead
of sleeping. Sizes are upper bounds on anything a peer accepts from the network: every
one of them exists so that a hostile peer costs a log line, never memory or CPU.
"""

from __future__ import annotations

import dataclasses

# DNS-SD service type (RFC 6763 section 7: _service._proto.domain).
SERVICE_TYPE = "_vswarm._tcp.local."
DEFAULT_SWARM = "default"

# The canonical model input: N x 1 x 28 x 28 float32 in [0, 1] (pixel / 255).
INPUT_NAME = "input"
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
DEFAULT_TOP_K = 2
MAX_TOP_K = NUM_CLASSES

# Size limits (bytes). A request carries one 1x28x28 float32 tensor (3,136 bytes,
# ~4.2 KB in base64) plus signed metadata; 64 KiB leaves room and bounds abuse.
MAX_INFER_BODY = 64 * 1024
# An image sent to /v1/classify: PNG/JPEG/.npy; decoded images are capped in pixels too.
MAX_CLASSIFY_BODY = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REPLY_BODY = 16 * 1024
# Batches of requests to one peer (swarm.wire.messages): at most this many items, one body.
MAX_BATCH_ITEMS = 32
MAX_INFER_BATCH_BODY = MAX_BATCH_ITEMS * 8 * 1024
MAX_REPLY_BATCH_BODY = MAX_BATCH_ITEMS * 2 * 1024
# A session offer or acceptance (swarm.crypto.session): keys, ids and a signature.
MAX_SESSION_BODY = 2 * 1024
# RFC 6763 section 6.2: a TXT record should stay well under 1300 bytes in total.
MAX_TXT_VALUE = 255
MAX_TXT_RECORD = 1300
# A peer announces at most this many addresses; more is noise or abuse.
MAX_PEER_ADDRESSES = 8

# Caps on tables keyed by peer-supplied data.
MAX_PEERS = 1024
MAX_SEEN_REQUEST_IDS = 65_536
MAX_EVIDENCE = 1_000
# Inputs waiting for the local model; callers past this wait for room (backpressure).
MAX_INFER_QUEUE = 1024
# Resolutions of announced services in flight at once.
MAX_PENDING_RESOLVES = 64
# The requester's pool of keep-alive HTTP connections to peers, in total and per peer
# (host and port); a call past these waits for a free one, within its deadline.
REQUESTER_MAX_CONNECTIONS = 128
REQUESTER_MAX_CONNECTIONS_PER_PEER = 16
# Exchanges a requester runs with one peer at once: one, and more only while a full batch
# (MAX_BATCH_ITEMS) waits for that peer; asks beyond wait and go as a batch.
REQUESTER_EXCHANGES_PER_PEER = 2
# HTTP requests one peer serves at once, per route; past this it answers 503 with
# Retry-After instead of queueing without bound. /v1/infer is cheap and micro-batched
# (its queue, MAX_INFER_QUEUE, is larger still); /v1/classify fans out to the swarm.
MAX_INFER_IN_FLIGHT = 512
MAX_CLASSIFY_IN_FLIGHT = 64
# A classify call that starts with this many of its requester's calls in flight (itself
# included) asks a majority of its ballots first and the rest only if those leave the
# label open (``Policy.wave`` "auto"): under load the swarm's capacity is worth more than
# the latency of asking everyone at once.
WAVE_IN_FLIGHT = 8
RETRY_AFTER_S = 1
# Sessions (swarm.crypto.session): how long a peer keeps one, how many it keeps (the oldest
# is forgotten first; its requester opens a new one), the longest lifetime a peer may
# announce, and the share of replies whose signatures a requester checks after the
# answer when their session MAC already proved who sent them (dissenting replies are
# all checked before the answer). A reply batch is drawn once: its one signature covers
# all its replies, so they are checked together or not at all.
SESSION_TTL_S = 600.0
MAX_SESSIONS = 4096
MAX_SESSION_TTL_MS = 86_400_000
LATE_SIGNATURE_SAMPLE = 0.125


@dataclasses.dataclass(frozen=True, slots=True)
class Timings:
    """Every timing constant of the runtime, in seconds unless the name says otherwise."""

    # A classify call's default deadline, from receipt to decision.
    deadline_s: float = 2.0
    # Connect timeout for one HTTP call to a peer.
    connect_timeout_s: float = 0.5
    # Hedge a variant's request to a second replica after this long without an answer
    # (Dean & Barroso, "The Tail at Scale": hedge after roughly the p95 latency).
    hedge_after_s: float = 0.25
    # After the minimum quorum has answered, wait at most this much longer for the rest
    # (hivemind's MoE client: k_min replies, then a short grace period).
    grace_s: float = 0.15
    # Replies and requests older (or further in the future) than this are stale.
    freshness_s: float = 30.0
    # A peer that failed is backed off for base * 2**(failures-1), capped.
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    # Consecutive failures after which a peer is suspected and dropped from the table
    # without waiting for its mDNS TTL to expire.
    suspect_after_failures: int = 3
    # A requester asks each suspected peer's /healthz this often, to take it back once it
    # answers (a peer cut off by a partition does not re-announce when it heals).
    probe_interval_s: float = 2.0
    # Micro-batching: wait at most this long to fill a batch of at most max_batch. 0 adds
    # no latency to a lone input: inputs that arrive while a batch runs form the next
    # batch anyway, which is where batching pays (sim.bench measures both).
    batch_wait_s: float = 0.0
    max_batch: int = 32
    # A batch the model runs in at most this long (measured when the engine starts) runs
    # on the event loop: handing it to the engine's thread and back costs more than that
    # (sim.bench measures both). Longer batches, and every batch when 0, run in the thread.
    inline_max_s: float = 0.001
    # mDNS record TTLs are zeroconf's defaults (120 s host, 4500 s other); a peer that
    # leaves says goodbye (TTL 0). Reputation halves every this many seconds.
    reputation_half_life_s: float = 3600.0
    # mDNS: resolving one announced service (SRV, TXT, A; RFC 6762 section 6 lets a
    # responder delay its answer up to 500 ms), registering one (probing takes ~1 s,
    # RFC 6762 section 8.1), and starting the responder or saying goodbye at shutdown.
    mdns_resolve_timeout_s: float = 3.0
    mdns_register_timeout_s: float = 10.0
    mdns_start_stop_timeout_s: float = 3.0
    # HTTP server: a client has this long to send a request body (bounds slow senders);
    # at shutdown, requests in flight get this long to finish.
    body_read_timeout_s: float = 5.0
    http_shutdown_s: float = 3.0


DEFAULT_TIMINGS = Timings()
