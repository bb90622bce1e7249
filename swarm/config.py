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

# The shipped family's model input: N x 1 x 28 x 28 float32 in [0, 1] (pixel / 255); on
# the wire, 1 x 28 x 28 uint8 pixels.
INPUT_NAME = "input"
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
DEFAULT_TOP_K = 2
MAX_TOP_K = NUM_CLASSES

# Size limits (bytes). An image sent to /v1/classify: PNG/JPEG/.npy; decoded images are
# capped in pixels too. Link messages are bounded by ``swarm.wire.codec`` from the family's
# input size.
MAX_CLASSIFY_BODY = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
# A JPEG's decoder shrinks it by up to 8 on a side before any pixel exists (its DCT
# scaling), so a phone's photo of up to 64 megapixels costs what 1 megapixel would.
MAX_JPEG_PIXELS = 64 * 1024 * 1024
# A group of asks to one peer travels as one message: at most this many.
MAX_BATCH_ITEMS = 32
# RFC 6763 section 6.2: a TXT record should stay well under 1300 bytes in total.
MAX_TXT_VALUE = 255
MAX_TXT_RECORD = 1300
# A peer announces at most this many addresses; more is noise or abuse.
MAX_PEER_ADDRESSES = 8

# Caps on tables keyed by peer-supplied data.
MAX_PEERS = 1024
# Inputs waiting for the local model; callers past this wait for room (backpressure).
MAX_INFER_QUEUE = 1024
# Resolutions of announced services in flight at once.
MAX_PENDING_RESOLVES = 64
# The requester's HTTP connections to peers (links and health probes), in total.
REQUESTER_MAX_CONNECTIONS = 128
# Exchanges a requester runs with one peer at once: one, and more only while a full batch
# (MAX_BATCH_ITEMS) waits for that peer; asks beyond wait and go as a batch.
REQUESTER_EXCHANGES_PER_PEER = 2
# A peer's caps (``swarm.link.websocket``, ``swarm.http.listener``): asks in flight on one
# link (more are refused, item by item, as overloaded), links held in all and per remote
# address, TCP connections in all and per remote address. Past a cap a peer refuses the
# new link or connection with 503 and a log line, and keeps serving what it holds.
MAX_LINK_ASKS = 256
MAX_LINKS = 512
MAX_LINKS_PER_ADDRESS = 8
MAX_CONNECTIONS = 1024
MAX_CONNECTIONS_PER_ADDRESS = 32
# Link hellos a peer remembers (each opens at most one link), until they are stale.
MAX_SEEN_HELLOS = 65_536
# /v1/classify requests one peer serves at once; past this it answers 503 with
# Retry-After instead of queueing without bound (each fans out to the swarm).
MAX_CLASSIFY_IN_FLIGHT = 64
# Of those, bodies read into memory at once (each up to MAX_CLASSIFY_BODY); the others
# wait their turn with their bytes still in the socket.
MAX_CLASSIFY_UPLOADS = 4
# A classify call that starts with this many of its requester's calls in flight (itself
# included) asks a majority of its ballots first and the rest only if those leave the
# label open (``Policy.wave`` "auto"): under load the swarm's capacity is worth more than
# the latency of asking everyone at once.
WAVE_IN_FLIGHT = 8
RETRY_AFTER_S = 1
# The share of replies whose signatures a requester checks after the answer (the link
# already proved who sent them; dissenting replies are all checked before the answer). A
# reply batch is drawn once: its one signature covers all its replies.
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
    # Links (swarm.link): the hello and welcome must come within link_handshake_s; both
    # ends ping every link_heartbeat_s (a vanished end is found within about twice that);
    # a peer closes a link silent for link_idle_s (its requester opens another when needed).
    link_handshake_s: float = 2.0
    link_heartbeat_s: float = 10.0
    link_idle_s: float = 600.0
    # HTTP server: an idle keep-alive connection is closed after keepalive_s; a client has
    # body_read_timeout_s to send a request body (bounds slow senders); at shutdown,
    # requests in flight get http_shutdown_s to finish.
    keepalive_s: float = 15.0
    body_read_timeout_s: float = 5.0
    http_shutdown_s: float = 3.0


DEFAULT_TIMINGS = Timings()
