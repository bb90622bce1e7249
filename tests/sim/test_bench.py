"""Tests of ``python -m sim.bench``: its CI mode works and its JSON is complete, and a
classify call never blocks the event loop. The targets are the full benchmark's to
check, not these tests'."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.bench import SECTIONS
from sim.benchmarks import legacy_voting
from sim.benchmarks.fleet import Fleet, requester
from sim.benchmarks.load import median_round
from sim.benchmarks.measure import Probe, classify_loop, gc_time, inputs, patched
from swarm import aio
from swarm.crypto.identity import Identity
from swarm.decision import voting
from swarm.errors import NoDecisionError
from swarm.inference.engine import default_manifest_path, load_manifest
from swarm.requester.fanout import Unchecked
from swarm.requester.requester import Requester
from swarm.wire import codec as wire
from swarm.wire import verify
from tests.swarm.test_voting import ballots_strategy

REPO = Path(__file__).resolve().parents[2]
QUICK_TIMEOUT_S = 240
# A callback this long is the loop standing still: every stage of a classify call takes
# well under a millisecond of CPU, so only a blocking call (or a rare preemption of this
# process on a loaded machine) gets near it.
SLOW_CALLBACK_S = 0.05
CALLS = 40


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_quick_bench_writes_complete_json(tmp_path: Path) -> None:
    """--quick runs every section and writes bench.json and bench.md with every key."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sim.bench", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("# sim.bench (quick)")
    assert set(SECTIONS) | {"meta", "targets"} <= out.keys()
    assert out["meta"]["quick"] is True
    assert out["meta"]["event_loop"] == aio.loop_name()
    models = out["variants"]["models"]
    assert {"reference", "V1", "V2", "V3", "V4", "V5"} <= models.keys()
    for m in models.values():
        assert _finite(m["latency_ms"]["p50"])
        assert _finite(m["latency_ms"]["p99"])
        assert _finite(m["throughput_per_s"])
    ov = out["overhead"]
    assert ov["peers"] == 5
    for key in (
        "floor_ms",
        "overhead_ratio",
        "overhead_ratio_no_early_exit",
        "overhead_ratio_wave",
        "crypto_share",
        "crypto_share_with_late_checks",
        "late_check_ms_per_call",
    ):
        assert _finite(ov[key]), key
    assert ov["crypto_share_with_late_checks"] >= ov["crypto_share"]
    # The floor is measured again after the calls; the ratios use the mean of the two.
    before, after = ov["floor_before_ms"], ov["floor_after_ms"]
    assert _finite(before) and _finite(after)
    assert ov["floor_ms"] == pytest.approx((before + after) / 2, abs=1e-3)
    assert _finite(ov["cpu_ms_per_call_wave"]["peers_total"])
    # The bare swarm ran beside classify, against the same floor.
    assert ov["bare_swarm_ms"]["n"] > 0
    assert ov["bare_swarm_vs_floor"] == pytest.approx(
        ov["bare_swarm_ms"]["p50"] / ov["floor_ms"], rel=0.01
    )
    # Every call decided once; the bare swarm plus the kept-on work is more than the bare.
    assert _finite(ov["decide_p50_ms"]) and ov["decide_p50_ms"] > 0
    assert ov["bare_plus_mandated_ms"] > ov["bare_swarm_ms"]["p50"] + ov["decide_p50_ms"]
    assert ov["bare_plus_mandated_vs_floor"] > ov["bare_swarm_vs_floor"]
    for key in ("cpu_ms_per_call", "cpu_ms_per_call_wave"):
        # The peers' /metrics were read: their models ran during the calls. (Against
        # peers_total only loosely: /proc counts CPU in 10 ms ticks, a few calls here.)
        assert _finite(ov[key]["peers_models"]) and ov[key]["peers_models"] > 0, ov[key]
        # The models' own CPU: at most the wall clock their runs took.
        cpu = ov[key]["peers_models_cpu"]
        assert _finite(cpu) and 0 < cpu <= ov[key]["peers_models"] * 1.01, ov[key]
    assert _finite(ov["models_cpu_vs_alone"]) and ov["models_cpu_vs_alone"] > 0
    assert ov["floor_with_swarm_models_cpu_ms"] >= ov["rtt_ms"]["p50"]
    stages = {"encode", "sign", "send", "infer", "verify", "check", "vote"}
    assert set(ov["breakdown_p50_ms"]) == stages
    assert ov["peer_crypto_ms"]["sessions"] is True
    fp = out["fast_path"]
    assert _finite(fp["current"]["classify_ms"]["p50"])
    assert _finite(fp["old_vote_numpy"]["p50_vs_current"])
    for row in (
        "old_connection_closed_on_cancel",
        "old_signatures_no_sessions",
        "old_aiohttp_client",
    ):
        assert _finite(fp[row]["p50_vs_current"]), row
    assert {
        "old_batch_wait_2ms",
        "old_engine_thread",
        "old_asyncio_loop",
        "old_aiohttp_server",
        "old_all",
        "vote_cost_ms",
    } <= fp.keys()
    tp = out["throughput"]
    assert _finite(tp["floor"]["per_s"])
    low, high = tp["floor_per_s_range"]
    assert 0 < low <= tp["floor"]["per_s"] <= high
    for rows in tp["levels"].values():  # each row against the floor measured around it
        for row in (r for r in rows.values() if r is not None):
            assert low <= row["floor_per_s"] <= high
            want = row["per_s"] / row["floor_per_s"]
            assert row["vs_floor"] == pytest.approx(want, rel=0.01, abs=0.001)
            assert row["rounds_vs_floor"] == [row["vs_floor"]]  # one round in the CI run
            assert _finite(row["vs_section_floor"])
            assert row["peers_cpu_ms_per_call"] >= 0
            assert 0 <= row["requester_gc_ms_per_call"] <= row["requester_cpu_ms_per_call"]
            assert row["models_cpu_ms_per_call"] is None or row["models_cpu_ms_per_call"] > 0
    assert _finite(tp["levels"]["batching_on"]["1"]["per_s"])
    assert "batching_off" in tp["levels"]
    assert _finite(tp["levels"]["batching_on_wave3"]["1"]["per_s"])
    assert _finite(tp["levels"]["batching_on_all_at_once"]["8"]["per_s"])
    assert _finite(tp["levels"]["batching_on_two_exchanges"]["8"]["per_s"])
    assert _finite(tp["levels"]["batching_on_trusted_first"]["8"]["per_s"])
    assert _finite(tp["levels"]["bare_swarm"]["8"]["per_s"])
    # The load shared among two requester processes: both ran at 8, one alone at 1.
    assert tp["requesters"] == 2
    shared = tp["levels"]["batching_on_requesters"]
    assert [shared[level]["requesters"] for level in ("1", "8")] == [1, 2]
    assert _finite(shared["8"]["per_s"]) and shared["8"]["requester_cpu_ms_per_call"] > 0
    # The peers' CPU per call around each row, and their models' share of it (/metrics).
    on = tp["levels"]["batching_on"]["8"]
    assert _finite(on["models_cpu_ms_per_call"]) and _finite(on["peers_cpu_ms_per_call"])
    level = out["scaling"]["levels"][0]
    assert level["peers"] == 5
    assert _finite(level["join_seen_by_all_s"])
    assert level["failures"] == 0  # five live peers on loopback decide every call
    for name in ("no_straggler_ms", "plain", "hedging", "early_exit", "hedging_and_early_exit"):
        assert _finite(out["tails"][name]["p99"]), name
        assert type(out["tails"]["failures"][name]) is int, name
    assert set(out["targets"]) == {
        "overhead_ratio_p50",
        "overhead_ratio_p50_no_early_exit",
        "overhead_ratio_p50_wave",
        "throughput_c32_vs_floor",
        "throughput_c32_wave_vs_floor",
        "throughput_c32_requesters_vs_floor",
        "crypto_share",
        "all_see_all_at_20_s",
        "p50_40_vs_5_peers",
    }
    assert time.monotonic() - started < QUICK_TIMEOUT_S


def _blocking(fn: Callable[..., Any]) -> Callable[..., Any]:
    def blocking(*args: Any, **kwargs: Any) -> Any:
        time.sleep(2 * SLOW_CALLBACK_S)  # what a synchronous call on the hot path does
        return fn(*args, **kwargs)

    return blocking


async def test_classify_never_blocks_the_event_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No callback of a classify call holds the loop for 50 ms; a blocking one would."""
    manifest = load_manifest(default_manifest_path())
    tensors = inputs(16)
    loop = asyncio.get_running_loop()
    async with Fleet(tmp_path) as fleet:
        await fleet.start(["V1", "V2", "V3", "V4", "V5"])
        async with requester(fleet, manifest, peers=5) as req:
            await classify_loop(req, tensors, count=10)  # connections open first
            loop.set_debug(True)
            loop.slow_callback_duration = SLOW_CALLBACK_S
            try:
                with caplog.at_level(logging.WARNING, logger="asyncio"):
                    clean = await classify_loop(req, tensors, count=CALLS)
                    slow_clean = _slow_callbacks(caplog)
                    caplog.clear()
                    # The probe itself: a verify that blocks must be caught on every call.
                    with patched(wire, "verify_reply", _blocking(wire.verify_reply)):
                        await classify_loop(req, tensors, count=5)
                    slow_blocked = _slow_callbacks(caplog)
            finally:
                loop.set_debug(False)
    assert clean.failures == 0
    # One preemption of this process by the machine's other work may look like a stall.
    assert len(slow_clean) <= 1, slow_clean
    assert len(slow_blocked) >= 5


def _slow_callbacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Executing")]


# --- the old vote the fast-path table puts back ---------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    num_classes=st.integers(2, 10),
    rule=st.sampled_from(voting.RULES),
    missing=st.integers(0, 4),
)
def test_legacy_vote_gives_the_same_results(
    data: st.DataObject, num_classes: int, rule: str, missing: int
) -> None:
    """The numpy vote kept for the fast-path row decides exactly as ``swarm.decision.voting``:
    label, scores, certificate and early exit, bit for bit, so the row compares cost
    alone."""
    ballots = data.draw(ballots_strategy(num_classes=num_classes))
    old = [legacy_voting.Ballot(x.peer_id, x.variant, x.topk, x.weight) for x in ballots]
    try:
        new_d = voting.decide(ballots, rule, num_classes=num_classes)
    except NoDecisionError:
        with pytest.raises(NoDecisionError):
            legacy_voting.decide(old, rule, num_classes=num_classes)
        return
    old_d = legacy_voting.decide(old, rule, num_classes=num_classes)
    assert (new_d.label, new_d.certified_f, new_d.used) == (
        old_d.label,
        old_d.certified_f,
        old_d.used,
    )
    assert new_d.scores == old_d.scores
    assert (new_d.margin, new_d.confidence) == (old_d.margin, old_d.confidence)
    assert voting.can_change(ballots, missing, rule, num_classes=num_classes) == (
        legacy_voting.can_change(old, missing, rule, num_classes=num_classes)
    )


def test_a_throughput_row_reports_its_median_round_whole() -> None:
    rows = [
        {"vs_floor": 0.5, "per_s": 500.0},
        {"vs_floor": 0.3, "per_s": 310.0},
        {"vs_floor": 0.4, "per_s": 420.0},
    ]
    assert median_round(rows) == {
        "vs_floor": 0.4,
        "per_s": 420.0,
        "rounds_vs_floor": [0.5, 0.3, 0.4],
    }
    # An even count takes the lower of the middle two: never a round better than half.
    assert median_round(rows[:2])["per_s"] == 310.0
    assert median_round(rows[:1])["rounds_vs_floor"] == [0.5]


def test_gc_time_counts_collections_only_inside_its_block() -> None:
    callbacks = len(gc.callbacks)
    with gc_time() as counter:
        for _ in range(3):
            gc.collect()
    assert counter.seconds > 0
    assert len(gc.callbacks) == callbacks
    counted = counter.seconds
    gc.collect()
    assert counter.seconds == counted


def test_probe_keeps_the_late_checks_apart() -> None:
    """A signature checked after its call answered (``Requester._check_late``) is timed as
    a late check; one checked on a call's path, as verify."""
    requester_identity, peer = Identity.generate(), Identity.generate()
    request = wire.build_request(
        requester_identity, swarm="probe", tensor=np.zeros((1, 28, 28), np.float32), deadline_ms=1
    )
    reply = wire.build_reply(
        peer, request, variant="V1", model_sha256="0" * 64, probs=np.full(10, 0.1), infer_us=1
    )
    record = SimpleNamespace(peer_id=peer.peer_id, public_key=peer.public_key)
    owner = SimpleNamespace(reputation=None, metrics=None)  # touched only by a bad signature
    with Probe() as probe:
        Requester._check_late(owner, [Unchecked(record, reply, None)])  # type: ignore[arg-type]
        assert Probe.LATE in probe.current and "verify" not in probe.current
        assert verify.verify_signature(peer.public_key, reply.signature, reply.signed_bytes())
    assert probe.current[Probe.LATE] > 0 and probe.current["verify"] > 0


def test_probe_times_the_decision_apart_and_within_the_vote() -> None:
    """``voting.decide`` counts in ``decide`` and in ``vote``; ``can_change``, in ``vote``
    alone."""
    ballots = [voting.Ballot(f"p{i}", f"V{i}", ((3, 0.8), (1, 0.1))) for i in range(3)]
    with Probe() as probe:
        assert not voting.can_change(ballots, 1)
        assert Probe.DECIDE not in probe.current
        before = probe.current["vote"]
        assert voting.decide(ballots).label == 3
    assert 0 < probe.current[Probe.DECIDE] <= probe.current["vote"] - before
