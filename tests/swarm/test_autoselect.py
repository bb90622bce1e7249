"""Tests of swarm.inference.autoselect: the pure choice, replica counting, measuring, the step."""

from __future__ import annotations

import hashlib
import os

import pytest
from structlog.testing import capture_logs

from swarm import config
from swarm.discovery.table import Announcement, PeerTable
from swarm.errors import ConfigError
from swarm.inference.autoselect import (
    VariantOption,
    auto_select,
    choose_variant,
    measure_latency,
    replica_counts,
)
from swarm.inference.manifest import Manifest


def option(name: str, accuracy: float, latency_ms: float, replicas: int = 0) -> VariantOption:
    return VariantOption(name, accuracy, latency_ms, replicas)


def add_peer(table: PeerTable, variant: str, family: str = "fa" * 16) -> None:
    key = os.urandom(32)
    peer_id = hashlib.sha256(key).hexdigest()[:20]
    ann = Announcement(
        swarm=table.swarm,
        peer_id=peer_id,
        public_key=key,
        role="peer",
        port=9000,
        variant=variant,
        model_sha256="ab" * 32,
        macs=1,
        accuracy=0.9,
        family=family,
    )
    txt = {k.encode(): v.encode() for k, v in ann.txt().items()}
    assert table.offer(f"{peer_id}.{config.SERVICE_TYPE}", txt, ["127.0.0.1"], 9000)


def test_uncovered_most_accurate_within_budget_wins() -> None:
    """An uncovered variant beats a covered one; among them the most accurate that fits."""
    options = [
        option("A", 0.95, 5.0, replicas=1),
        option("B", 0.94, 9.0),  # over budget
        option("C", 0.93, 2.0),
        option("D", 0.92, 1.0),
    ]
    choice = choose_variant(options, latency_budget_ms=6.0)
    assert (choice.name, choice.reason, choice.replicas) == ("C", "uncovered", 0)


def test_all_covered_prefers_fewest_replicas_then_accuracy() -> None:
    """With every variant served, the scarcest wins; ties go to the more accurate."""
    options = [
        option("A", 0.95, 1.0, replicas=3),
        option("B", 0.90, 1.0, replicas=1),
        option("C", 0.93, 1.0, replicas=1),
    ]
    choice = choose_variant(options, latency_budget_ms=None)
    assert (choice.name, choice.reason) == ("C", "fewest_replicas")


def test_budget_excludes_uncovered_slow_variants() -> None:
    """An uncovered variant too slow for the budget loses to a covered one that fits."""
    options = [option("slow", 0.99, 50.0), option("fast", 0.90, 1.0, replicas=2)]
    choice = choose_variant(options, latency_budget_ms=10.0)
    assert (choice.name, choice.reason) == ("fast", "fewest_replicas")


def test_nothing_fits_the_budget_falls_back_to_the_fastest() -> None:
    """When no variant meets the budget the device still serves the fastest one."""
    options = [option("A", 0.95, 30.0), option("B", 0.90, 20.0, replicas=4)]
    choice = choose_variant(options, latency_budget_ms=1.0)
    assert (choice.name, choice.reason) == ("B", "over_budget_fastest")


def test_ties_are_broken_by_name() -> None:
    """Equal options give the same answer every time (the first name)."""
    options = [option("Z", 0.9, 1.0), option("M", 0.9, 1.0)]
    assert choose_variant(options, latency_budget_ms=None).name == "M"
    assert choose_variant(options[::-1], latency_budget_ms=None).name == "M"


def test_no_options_is_a_config_error() -> None:
    """A manifest without variants cannot be chosen from."""
    with pytest.raises(ConfigError, match="no variant"):
        choose_variant([], latency_budget_ms=None)


def test_replica_counts_only_usable_peers() -> None:
    """Counts come from usable peers; suspected ones and unknown variants do not count."""
    table = PeerTable("s")
    for variant in ("T1", "T1", "T2", "X9"):
        add_peer(table, variant)
    suspect = next(r for r in table.records() if r.variant == "T2")
    for _ in range(config.DEFAULT_TIMINGS.suspect_after_failures):
        table.report_failure(suspect.peer_id, now=0.0)
    assert replica_counts(table, ["T1", "T2", "T3"]) == {"T1": 2, "T2": 0, "T3": 0}


async def test_measure_latency_is_a_positive_median(tiny_manifest: Manifest) -> None:
    """Measuring a tiny model gives a small positive number of milliseconds."""
    ms = await measure_latency(tiny_manifest.get("T1"), threads=1, runs=5)
    assert 0.0 < ms < 1000.0


async def test_auto_select_picks_uncovered_and_logs_why(tiny_manifest: Manifest) -> None:
    """With T3 and T2 served, auto picks T1 and logs every option it weighed; a T1 of
    another family covers nothing."""
    table = PeerTable("s")
    add_peer(table, "T3", tiny_manifest.family_id)
    add_peer(table, "T2", tiny_manifest.family_id)
    add_peer(table, "T1", "0b" * 16)
    with capture_logs() as logs:
        choice = await auto_select(
            tiny_manifest, table, threads=1, latency_budget_ms=None, browse_s=0.0, runs=3
        )
    assert (choice.name, choice.reason) == ("T1", "uncovered")
    [event] = [e for e in logs if e["event"] == "variant_auto_selected"]
    assert set(event["options"]) == {"T1", "T2", "T3"}
    assert event["options"]["T2"]["replicas"] == 1


async def test_auto_select_refuses_a_bad_browse_time(tiny_manifest: Manifest) -> None:
    """A browse time outside [0, MAX_BROWSE_S] is a ConfigError."""
    with pytest.raises(ConfigError, match="browse"):
        await auto_select(
            tiny_manifest, PeerTable("s"), threads=1, latency_budget_ms=None, browse_s=-1
        )
