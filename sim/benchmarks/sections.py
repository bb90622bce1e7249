"""The benchmark's sections: each returns a JSON-ready dict.

Every comparison is measured in the same run as what it is compared with; where two
configurations are compared, their calls are interleaved in rounds so that the drift of
a noisy machine falls on both alike.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import numpy as np

from sim.benchmarks.bare import BareSwarm
from sim.benchmarks.fleet import Peer, cpu_seconds, model_seconds, process_cpu_seconds
from sim.benchmarks.measure import (
    THROUGHPUT_BATCH,
    FloatArray,
    Probe,
    classify_loop,
    probed_loop,
    quantile,
    ratio,
    run_ms,
    session,
    summary,
)
from sim.benchmarks.wsfloor import WsFloor
from swarm import config
from swarm.crypto.identity import Identity, TrustStore
from swarm.crypto.session import HelloGuard, Offer
from swarm.decision import voting
from swarm.inference.manifest import Manifest
from swarm.requester.call import Policy
from swarm.requester.fanout import ReplyInfo
from swarm.requester.requester import Requester
from swarm.wire import codec
from swarm.wire.messages import Answers, Ask, Asks, build_request, unix_ms

CORES: Final = os.cpu_count() or 1
# The wave the benchmark measures (``Policy.wave``): three ballots first, two in reserve.
WAVE: Final = 3
# A straggler is paused (SIGSTOP) this long in every period; two replicas drift apart.
STRAGGLE_S: Final = 0.1
STRAGGLE_PERIODS_S: Final = (0.2, 0.27)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many runs each section makes: the full benchmark, or the CI smoke run."""

    quick: bool
    model_runs: int = 300
    batch_runs: int = 40
    rtt_runs: int = 500
    classify_runs: int = 300
    rounds: int = 5
    per_round: int = 40
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    per_level: int = 400
    # Rounds of the throughput table, each row of each round against its own floor: a
    # row reports its median round (see ``load.throughput``).
    throughput_rounds: int = 3
    # Requester processes of the throughput row that shares each load among several
    # (``load.REQUESTERS``): one per 4 cores, at most 4; none below 2 (the row is null).
    # One Python requester's CPU, not the swarm, bounds the rows of one on many cores.
    requesters: int = min(4, CORES // 4)
    scale: tuple[int, ...] = (5, 10, 20, 40)
    scale_runs: int = 150
    tail_runs: int = 60  # per configuration and round
    wire_calls: int = 300  # calls whose bytes on the wire are counted

    @classmethod
    def ci(cls) -> Plan:
        return cls(
            quick=True,
            model_runs=30,
            batch_runs=5,
            rtt_runs=50,
            classify_runs=30,
            rounds=2,
            per_round=8,
            concurrency=(1, 8),
            per_level=24,
            throughput_rounds=1,
            requesters=2,  # the row runs in CI too, however few the cores
            scale=(5,),
            scale_runs=10,
            tail_runs=6,
            wire_calls=40,
        )


# --- 1. variants ---------------------------------------------------------------------


def variants(manifest: Manifest, plan: Plan) -> dict[str, Any]:
    """Each model's latency (1 thread, batch 1) and throughput (batch 32) vs the reference."""
    x1 = np.zeros((1, 1, 28, 28), np.float32)
    x32 = np.zeros((THROUGHPUT_BATCH, 1, 28, 28), np.float32)
    models: dict[str, Any] = {}
    for spec in manifest.models:
        sess = session(spec, threads=1)
        lat = summary(run_ms(sess, x1, plan.model_runs))
        batch = summary(run_ms(sess, x32, plan.batch_runs))
        models[spec.name] = {
            "role": spec.role,
            "latency_ms": lat,
            "batch32_ms": batch,
            "throughput_per_s": round(THROUGHPUT_BATCH / batch["p50"] * 1000, 1),
        }
    ref = next((m for m in models.values() if m["role"] == "reference"), None)
    for entry in models.values():
        if ref is not None:
            entry["latency_vs_reference"] = ratio(
                entry["latency_ms"]["p50"], ref["latency_ms"]["p50"]
            )
            entry["throughput_vs_reference"] = ratio(
                entry["throughput_per_s"], ref["throughput_per_s"]
            )
    return {"threads": 1, "batch": THROUGHPUT_BATCH, "models": models}


def model_latencies(manifest: Manifest, names: Sequence[str], runs: int) -> dict[str, float]:
    """Each named model's p50 latency (ms; 1 thread, batch 1), as ``variants`` measures it."""
    x1 = np.zeros((1, 1, 28, 28), np.float32)
    return {
        name: quantile(run_ms(session(manifest.get(name), threads=1), x1, runs), 0.5)
        for name in names
    }


def floor_ms(latencies: dict[str, float], chosen: Sequence[str], rtt_ms: float) -> float:
    """The issue's floor: the models' time on the shared cores, plus one round trip."""
    lat = [latencies[name] for name in chosen]
    return max(*lat, sum(lat) / CORES) + rtt_ms


# --- 2. overhead ---------------------------------------------------------------------

# The stages of a call in the overhead table (``Probe``), in the order a call meets them.
BREAKDOWN: Final = ("encode", "seal", "send", "infer", "open", "decode", "check", "verify", "vote")


NO_EARLY_EXIT: Final = Policy(early_exit=False)  # wait for every reply asked


async def overhead(
    req: Requester,
    tensors: Sequence[FloatArray],
    latencies: dict[str, float],
    rtt: list[float],
    fanout: list[float],
    plan: Plan,
    peers: Sequence[Peer],
    bare: BareSwarm,
    link_floor: WsFloor,
    floor_again: Callable[[Sequence[str]], Awaitable[float]] | None = None,
) -> dict[str, Any]:
    """classify p50 against the floor, with and without early exit, and its stages.

    ``fanout`` is a reference: one POST of a request-sized body to each of five trivial
    aiohttp handlers at once, what the transport alone costs on these cores. ``bare``
    runs the same models as processes with nothing around them (``sim.benchmarks.bare``),
    its calls interleaved with classify's: the least such a swarm costs here.
    ``link_floor`` adds what every call must do on this design (``sim.benchmarks.wsfloor``:
    aiohttp WebSockets, the codec, AEAD, signatures, one robust decide). The floor
    is the mean of the one from ``latencies`` and ``rtt`` (measured before) and, when
    given, ``floor_again`` of the chosen variants after the calls: the machine's speed
    drifts over minutes, and the calls sit between the two.
    """
    chosen = sorted(req.available_variants())
    floor_before = floor_ms(latencies, chosen, quantile(rtt, 0.5))
    with_exit: list[float] = []
    without: list[float] = []
    waved: list[float] = []
    bare_ms: list[float] = []
    links_ms: list[float] = []
    cpu_links = np.zeros(2)  # the link floor's [requester, workers] CPU seconds
    stages: list[dict[str, float]] = []
    per_round = max(1, plan.classify_runs // plan.rounds)
    cpu_req = cpu_peers = cpu_req_wave = cpu_peers_wave = 0.0
    models = np.zeros(2)  # the peers' models: [wall clock, CPU] seconds
    models_wave = np.zeros(2)
    wave = Policy(wave=WAVE)
    for _ in range(plan.rounds):
        req0, peers0 = time.process_time(), sum(cpu_seconds(p) for p in peers)
        models0 = await model_seconds(peers)
        lat, calls = await probed_loop(req, tensors, per_round)
        cpu_req += time.process_time() - req0
        cpu_peers += sum(cpu_seconds(p) for p in peers) - peers0
        models += await model_seconds(peers) - models0
        with_exit += lat
        stages += calls
        loop = await classify_loop(req, tensors, count=per_round, policy=NO_EARLY_EXIT)
        without += loop.latencies_ms
        peers0 = sum(cpu_seconds(p) for p in peers)
        models0 = await model_seconds(peers)
        loop = await classify_loop(req, tensors, count=per_round, policy=wave)
        cpu_req_wave += loop.cpu_s
        cpu_peers_wave += sum(cpu_seconds(p) for p in peers) - peers0
        models_wave += await model_seconds(peers) - models0
        waved += loop.latencies_ms
        bare_ms += (await bare.loop(tensors, count=per_round))[0]
        before = np.array([time.process_time(), _workers_cpu(link_floor)])
        links_ms += await link_floor.loop(tensors, count=per_round)
        cpu_links += np.array([time.process_time(), _workers_cpu(link_floor)]) - before
    floor_after = floor_before if floor_again is None else await floor_again(chosen)
    floor = (floor_before + floor_after) / 2
    p50 = quantile(with_exit, 0.5)
    p50_all = quantile(without, 0.5)
    p50_wave = quantile(waved, 0.5)
    breakdown = {
        stage: round(quantile([c.get(stage, 0.0) for c in stages], 0.5), 4) for stage in BREAKDOWN
    }
    peer_crypto = _peer_crypto_ms(req)
    # The requester's: sealing its asks, opening the answers, checking the batch
    # signatures of dissenting replies (most calls have none); the median call's.
    requester_crypto = quantile(
        [sum(c.get(k, 0.0) for k in ("seal", "open", "verify")) for c in stages], 0.5
    )
    # The sampled late checks, per call on average (most calls have none).
    late = sum(c.get(Probe.LATE, 0.0) for c in stages) / max(1, len(stages))
    on_path_crypto = requester_crypto + peer_crypto["on_path"]
    decide = quantile([c.get(Probe.DECIDE, 0.0) for c in stages], 0.5)
    last_send = [c[Probe.LAST_SEND] for c in stages if Probe.LAST_SEND in c]
    # The bare swarm plus only the work the targets keep on (the crypto on a call's path,
    # one robust decision): the p50 of a swarm whose HTTP, JSON, checks of freshness and
    # replay, and bookkeeping cost nothing. A sum of medians measured in this run.
    mandated = quantile(bare_ms, 0.5) + on_path_crypto + decide
    return {
        "peers": len(chosen),
        "variants": chosen,
        "cores": CORES,
        "rtt_ms": summary(rtt),
        "floor_ms": round(floor, 4),
        "floor_before_ms": round(floor_before, 4),
        "floor_after_ms": round(floor_after, 4),
        "unsigned_fanout_ms": summary(fanout),
        "unsigned_fanout_vs_floor": ratio(quantile(fanout, 0.5), floor),
        # The same models behind a raw fan-out, no protocol: what no protocol work removes.
        "bare_swarm_ms": summary(bare_ms),
        "bare_swarm_vs_floor": ratio(quantile(bare_ms, 0.5), floor),
        "decide_p50_ms": round(decide, 4),
        "bare_plus_mandated_ms": round(mandated, 4),
        "bare_plus_mandated_vs_floor": ratio(mandated, floor),
        # classify against that: what the protocol's machinery adds beyond the work kept.
        "classify_vs_bare_plus_mandated": ratio(p50, mandated),
        # The same models behind the link's mandated work and nothing else: the least
        # this design (aiohttp WebSockets, msgpack, AEAD, signatures, robust vote) costs.
        "link_floor_ms": summary(links_ms),
        "link_floor_vs_floor": ratio(quantile(links_ms, 0.5), floor),
        "classify_vs_link_floor": ratio(p50, quantile(links_ms, 0.5)),
        "cpu_ms_per_call_link_floor": {
            "requester": round(float(cpu_links[0]) * 1000 / max(1, len(links_ms)), 4),
            "peers_total": round(float(cpu_links[1]) * 1000 / max(1, len(links_ms)), 4),
        },
        "classify_ms": summary(with_exit),
        "classify_no_early_exit_ms": summary(without),
        "overhead_ratio": ratio(p50, floor),
        "overhead_ratio_no_early_exit": ratio(p50_all, floor),
        # Early exit before the send: WAVE ballots first, the rest only if still open.
        "wave": WAVE,
        "classify_wave_ms": summary(waved),
        "overhead_ratio_wave": ratio(p50_wave, floor),
        "early_exit_share": round(
            sum(c.get("early", 0.0) for c in stages) / max(1, len(stages)), 3
        ),
        "breakdown_p50_ms": breakdown,
        "breakdown_share_of_p50": {k: ratio(v, p50) for k, v in breakdown.items()},
        # How long after a call began its last ask started to leave (the others are
        # sent before it, one by one): the fan-out's own spread.
        "last_ask_sent_at_ms": summary(last_send),
        "requester_crypto_ms": round(requester_crypto, 4),
        "peer_crypto_ms": peer_crypto,
        "crypto_on_path_ms": round(on_path_crypto, 4),
        # CPU per call (early exit on): the floor counts the models' share of the cores,
        # and none of the HTTP, JSON and signatures of five servers and one client.
        # peers_models: of peers_total, the time their models ran (their /metrics, wall
        # clock, waits for a core included); peers_models_cpu: their models' own CPU. The
        # rest of peers_total is what serving costs around the model.
        "cpu_ms_per_call": _cpu_per_call(cpu_req, cpu_peers, models, len(with_exit)),
        "cpu_ms_per_call_wave": _cpu_per_call(
            cpu_req_wave, cpu_peers_wave, models_wave, len(waved)
        ),
        # The floor takes each model's latency alone in one process. Run as the swarm
        # runs them (five processes and a requester taking turns on the cores), the
        # same models cost this much more CPU per call; and the floor with that CPU.
        "models_cpu_vs_alone": ratio(
            models[1] * 1000 / len(with_exit), sum(latencies[v] for v in chosen)
        ),
        "floor_with_swarm_models_cpu_ms": round(
            max(*(latencies[v] for v in chosen), models[1] * 1000 / len(with_exit) / CORES)
            + quantile(rtt, 0.5),
            4,
        ),
        # The requester seals its asks, opens the answers and checks the signatures of
        # dissenters; on the critical path one peer opens the asks, signs its reply
        # batch and seals the answers.
        "crypto_share": ratio(on_path_crypto, p50),
        # After a call has answered, the requester checks the signatures of a sample of
        # the replies only their link vouched for: on no call's path, but CPU all the
        # same. Their mean per call, and the share with them.
        "late_check_ms_per_call": round(late, 4),
        "crypto_share_with_late_checks": ratio(on_path_crypto + late, p50),
    }


def _workers_cpu(link_floor: WsFloor) -> float:
    return sum(process_cpu_seconds(p.pid) for p in link_floor.processes)


def _cpu_per_call(
    requester: float, peers: float, models: np.ndarray, calls: int
) -> dict[str, float]:
    calls = max(1, calls)
    return {
        "requester": round(requester * 1000 / calls, 4),
        "peers_total": round(peers * 1000 / calls, 4),
        "peers_models": round(float(models[0]) * 1000 / calls, 4),
        "peers_models_cpu": round(float(models[1]) * 1000 / calls, 4),
    }


def _peer_crypto_ms(req: Requester, runs: int = 200) -> dict[str, Any]:
    """A peer's share of the crypto on a call's critical path (ms, p50): open one sealed
    asks message of one input, sign the reply batch of its one reply, seal the answers.
    Real messages of ``req``'s swarm and family, on a link opened by the real handshake."""
    peer = Identity.generate()
    offer = Offer(req.identity, swarm=req.swarm, family=req.family)
    guard = HelloGuard(
        peer,
        swarm=req.swarm,
        family=req.family,
        trust=TrustStore.open(),
        freshness_s=60,
        max_asks=config.MAX_LINK_ASKS,
    )
    welcome, peer_out, peer_in = guard.accept(offer.hello, now_ms=unix_ms())
    requester_out, _ = offer.accept(
        welcome,
        expected_peer_id=peer.peer_id,
        expected_key=peer.public_key,
        now_ms=unix_ms(),
        freshness_s=60,
    )
    tensor = np.zeros(req.input_shape, np.float32)
    samples: dict[str, list[float]] = {k: [] for k in ("open", "sign", "seal")}
    for number in range(runs):
        # The two ends' counters stay in step: the requester seals what the peer opens.
        request = build_request(
            swarm=req.swarm,
            family=req.family,
            requester_id=req.identity.peer_id,
            tensor=tensor,
            deadline_ms=1000,
        )
        ask = Ask(request.request_id, request.k, request.deadline_ms, request.input)
        sealed = requester_out.seal(codec.encode_asks(Asks(number, (ask,))))
        reply = codec.build_reply(
            request,
            responder_id=peer.peer_id,
            variant="V1",
            model_sha256="0" * 64,
            probs=np.full(10, 0.1),
            infer_us=1,
        )
        t0 = time.perf_counter()
        peer_in.open(sealed)
        t1 = time.perf_counter()
        batch = codec.sign_replies(peer, [reply])
        t2 = time.perf_counter()
        peer_out.seal(codec.encode_answers(Answers(number, batch)))
        t3 = time.perf_counter()
        for name, (x, y) in zip(samples, ((t0, t1), (t1, t2), (t2, t3)), strict=True):
            samples[name].append((y - x) * 1000)
    p50 = {name: quantile(values, 0.5) for name, values in samples.items()}
    return {
        "open": round(p50["open"], 4),
        "sign": round(p50["sign"], 4),
        "seal": round(p50["seal"], 4),
        "on_path": round(sum(p50.values()), 4),
    }


# --- the fast path: the peers' options against their defaults, same run --------------

# Peers started with an option other than the default: each row runs against a fleet of
# its own (``sim.bench.PEER_OPTIONS``); ``old_all`` takes every one of them at once.
OLD_PEER_ROWS: Final = ("old_batch_wait_2ms", "old_engine_thread", "old_asyncio_loop", "old_all")


async def fast_path(
    req: Requester,
    tensors: Sequence[FloatArray],
    plan: Plan,
    *,
    old_peers: dict[str, Requester],
) -> dict[str, Any]:
    """classify p50/p99 against the default peers and against peers started with each
    other option (``old_peers``: a requester of each such fleet), interleaved in rounds.
    ``vote_cost_ms``: one call's voting work, measured on the current calls' replies."""
    configs: dict[str, Requester | None] = {
        "current": req,
        **{name: old_peers.get(name) for name in OLD_PEER_ROWS},
    }
    samples: dict[str, list[float]] = {name: [] for name in configs}
    ballots: list[tuple[ReplyInfo, ...]] = []
    for _ in range(plan.rounds):
        for name, target in configs.items():
            if target is None:
                continue
            loop = await classify_loop(target, tensors, count=plan.per_round)
            samples[name] += loop.latencies_ms
            if name == "current":
                ballots += loop.replies
    base = quantile(samples["current"], 0.5)
    out: dict[str, Any] = {}
    for name, values in samples.items():
        if not values:
            out[name] = None  # its peers are not started in the CI mode
            continue
        p50 = quantile(values, 0.5)
        out[name] = {"classify_ms": summary(values), "p50_vs_current": ratio(p50, base)}
    out["vote_cost_ms"] = _vote_cost(ballots, asked=len(req.available_variants()))
    return out


def _vote_cost(calls: Sequence[tuple[ReplyInfo, ...]], asked: int) -> dict[str, float]:
    """One call's voting work (ms, p50 over ``calls``): the early-exit check after each
    reply but the last, then the decision, on the replies that real calls of this run
    counted, in the order they arrived, ``asked`` ballots expected."""
    sets = [
        [voting.Ballot(r.peer, r.variant, r.topk, r.weight) for r in replies]
        for replies in calls
        if replies
    ]
    bound = max((b.weight for ballots in sets for b in ballots), default=1.0)
    times: list[float] = []
    for ballots in sets:
        start = time.perf_counter()
        for k in range(1, len(ballots)):
            voting.can_change(ballots[:k], missing=asked - k, missing_weight=bound)
        voting.decide(ballots)
        times.append((time.perf_counter() - start) * 1000)
    return {"calls": len(sets), "p50": round(quantile(times, 0.5), 4)}
