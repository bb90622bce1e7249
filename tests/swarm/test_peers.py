"""Tests of swarm.discovery.table: TXT announcements and the peer table."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

import pytest
from structlog.testing import capture_logs

from swarm import config
from swarm.config import Timings
from swarm.discovery.table import Announcement, PeerEvent, PeerRecord, PeerTable, parse_announcement
from swarm.errors import ConfigError, DecodeError, DiscoveryTimeoutError, VerificationError
from tests.swarm.announce import announcement, new_key, pid, service

WAIT_S = 10.0  # upper bound for mDNS to deliver; tests finish as soon as it does


def txt_bytes(ann: Announcement, **changes: str | None) -> dict[bytes, bytes | None]:
    pairs: dict[str, str | None] = {**ann.txt(), **changes}
    return {k.encode(): None if v is None else v.encode() for k, v in pairs.items()}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- announcements ----------------------------------------------------------------------


def test_announcement_round_trips_through_txt() -> None:
    """A serving peer's announcement survives TXT encoding and parsing unchanged."""
    ann = announcement()
    assert parse_announcement(txt_bytes(ann), port=8080, swarm="s1") == ann


def test_requester_announcement_needs_no_variant() -> None:
    """A requester announces without variant fields and parses back the same."""
    ann = announcement(
        role="requester", variant="", model_sha256="", macs=0, accuracy=0.0, family=""
    )
    assert "variant" not in ann.txt()
    assert "family" not in ann.txt()
    assert parse_announcement(txt_bytes(ann), port=8080, swarm="s1") == ann


def test_a_serving_peer_announces_its_family() -> None:
    """The family id travels in the TXT record and must be one (32 hex digits)."""
    ann = announcement()
    assert ann.txt()["family"] == ann.family
    assert parse_announcement(txt_bytes(ann), port=8080, swarm="s1").family == ann.family
    with pytest.raises(ConfigError, match="family"):
        announcement(family="nope")


def test_txt_record_is_small() -> None:
    """Every TXT value fits MAX_TXT_VALUE and the record stays far under RFC 6763's 1300."""
    ann = announcement(swarm="s" * 63, variant="v" * 63)
    txt = ann.txt()
    assert all(len(k) <= 9 for k in txt)  # RFC 6763 section 6.4
    assert all(len(v) <= config.MAX_TXT_VALUE for v in txt.values())
    assert sum(len(k) + len(v) + 2 for k, v in txt.items()) < 400


def test_peer_id_rule_matches_identity_module() -> None:
    """The local peer-id rule is the one swarm.crypto.identity implements."""
    identity = pytest.importorskip("swarm.crypto.identity")
    key = new_key()
    assert identity.peer_id_for(key) == pid(key)


@pytest.mark.parametrize(
    "kw",
    [
        {"peer_id": "0" * 20},
        {"port": 0},
        {"swarm": "bad swarm"},
        {"variant": ""},
        {"model_sha256": "xyz"},
        {"accuracy": 1.5},
        {"accuracy": math.nan},
        {"macs": -1},
        {"role": "boss"},
        {"public_key": b"short"},
    ],
)
def test_invalid_local_announcement(kw: dict[str, Any]) -> None:
    """An announcement with a bad field is refused at construction with ConfigError."""
    with pytest.raises(ConfigError, match="invalid announcement"):
        announcement(**kw)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"proto": "9"}, "protocol_version"),
        ({"proto": None}, None),
        ({"swarm": "s2"}, "other_swarm"),
        ({"id": "0" * 20}, "peer_id_mismatch"),
    ],
)
def test_parse_refuses_foreign_records(changes: dict[str, str | None], reason: str | None) -> None:
    """Another protocol version, another swarm, or an id not bound to the key are refused."""
    ann = announcement()
    with pytest.raises(DecodeError if reason is None else VerificationError) as info:
        parse_announcement(txt_bytes(ann, **changes), port=8080, swarm="s1")
    if reason is not None:
        assert isinstance(info.value, VerificationError)
        assert info.value.reason == reason


@pytest.mark.parametrize(
    "changes",
    [
        {"pk": "!!notbase64!!"},
        {"pk": "AAAA"},
        {"macs": "many"},
        {"macs": "-5"},
        {"acc": "nan"},
        {"acc": "2"},
        {"role": "boss"},
        {"variant": None},
        {"variant": "x" * 300},
        {"sha256": "zz"},
        {"swarm": "s1", "id": "é"},
    ],
)
def test_parse_malformed_is_decode_error(changes: dict[str, str | None]) -> None:
    """Every malformed TXT record is a DecodeError, never another exception."""
    ann = announcement()
    with pytest.raises(DecodeError):
        parse_announcement(txt_bytes(ann, **changes), port=8080, swarm="s1")


def test_parse_non_ascii_bytes() -> None:
    """Raw non-ASCII bytes in a TXT value are a DecodeError."""
    props = txt_bytes(announcement())
    props[b"variant"] = b"\xff\xfe"
    with pytest.raises(DecodeError, match="ASCII"):
        parse_announcement(props, port=8080, swarm="s1")


# --- peer table -------------------------------------------------------------------------


def offer(table: PeerTable, ann: Announcement, **changes: str | None) -> PeerRecord | None:
    return table.offer(service(ann.peer_id), txt_bytes(ann, **changes), ["127.0.0.1"], ann.port)


def test_offer_adds_record_and_ignores_with_one_log_line() -> None:
    """A bad record is ignored with exactly one log line per peer and reason."""
    table = PeerTable("s1")
    good, bad = announcement(), announcement()
    with capture_logs() as logs:
        assert offer(table, good) is not None
        for _ in range(3):
            assert offer(table, bad, swarm="s2") is None
        assert offer(table, bad, proto="9") is None
    ignored = [e for e in logs if e["event"] == "peer_ignored"]
    assert [e["reason"] for e in ignored] == ["other_swarm", "protocol_version"]
    assert [r.peer_id for r in table.records()] == [good.peer_id]
    assert table.ignored[service(bad.peer_id)] == "protocol_version"


def test_service_name_must_be_peer_id() -> None:
    """A record announced under a name other than its peer id is ignored."""
    table = PeerTable("s1")
    ann = announcement()
    assert table.offer(service("f" * 20), txt_bytes(ann), ["127.0.0.1"], 8080) is None
    assert table.ignored[service("f" * 20)] == "name_mismatch"


def test_record_turning_bad_is_dropped() -> None:
    """A known peer that re-announces a bad record is removed, and listeners hear it."""
    table = PeerTable("s1")
    events: list[tuple[PeerEvent, str]] = []
    table.add_listener(lambda event, record: events.append((event, record.peer_id)))
    ann = announcement()
    offer(table, ann)
    offer(table, ann, macs="lots")
    assert ann.peer_id not in table
    assert events == [("added", ann.peer_id), ("removed", ann.peer_id)]


def test_addresses_are_checked() -> None:
    """Bad and multicast addresses are dropped; a record with none left is ignored."""
    table = PeerTable("s1")
    ann = announcement()
    props = txt_bytes(ann)
    record = table.offer(service(ann.peer_id), props, ["nope", "224.0.0.251", "127.0.0.2"], 1)
    assert record is not None
    assert record.addresses == ("127.0.0.2",)
    assert table.offer(service(ann.peer_id), props, ["::1", "0.0.0.0"], 1) is None
    assert table.ignored[service(ann.peer_id)] == "malformed_txt"


def test_table_is_bounded_and_evicts_suspects_first() -> None:
    """The table holds at most max_peers; a suspected peer makes room, a healthy one doesn't."""
    table = PeerTable("s1", max_peers=2, timings=Timings(suspect_after_failures=1))
    a, b, c, d = (announcement() for _ in range(4))
    offer(table, a)
    offer(table, b)
    assert offer(table, c) is None
    assert table.ignored[service(c.peer_id)] == "table_full"
    table.report_failure(a.peer_id, now=0.0)
    assert offer(table, d) is not None
    assert {r.peer_id for r in table.records()} == {b.peer_id, d.peer_id}


def test_backoff_and_suspicion_with_injected_clock() -> None:
    """Failures back a peer off 1 s, 2 s, then suspect it until it answers again."""
    clock = Clock()
    timings = Timings(backoff_base_s=1.0, backoff_max_s=30.0, suspect_after_failures=3)
    table = PeerTable("s1", timings=timings, clock=clock)
    events: list[PeerEvent] = []
    table.add_listener(lambda event, _record: events.append(event))
    ann = announcement()
    offer(table, ann)
    t0 = clock.now

    record = table.report_failure(ann.peer_id, t0)
    assert record is not None
    assert (record.failures, record.suspected_until) == (1, t0 + 1.0)
    assert table.candidates(t0 + 0.999) == []
    assert [r.peer_id for r in table.candidates(t0 + 1.0)] == [ann.peer_id]

    record = table.report_failure(ann.peer_id, t0 + 1.0)
    assert record is not None
    assert record.suspected_until == t0 + 3.0
    record = table.report_failure(ann.peer_id, t0 + 3.0)
    assert record is not None
    assert record.suspected
    assert table.candidates(t0 + 1e9) == []
    assert [r.peer_id for r in table.suspected()] == [ann.peer_id]

    clock.now = t0 + 50
    table.report_success(ann.peer_id)
    assert [r.peer_id for r in table.candidates()] == [ann.peer_id]
    got = table.get(ann.peer_id)
    assert got is not None
    assert (got.failures, got.last_seen) == (0, t0 + 50)
    assert events == ["added", "updated", "updated", "suspected", "recovered"]


def test_backoff_is_capped() -> None:
    """Backoff grows exponentially but never past backoff_max_s."""
    timings = Timings(backoff_base_s=1.0, backoff_max_s=30.0, suspect_after_failures=10_000)
    table = PeerTable("s1", timings=timings)
    ann = announcement()
    offer(table, ann)
    record = None
    for _ in range(2000):
        record = table.report_failure(ann.peer_id, 0.0)
    assert record is not None
    assert record.suspected_until == 30.0


def test_reannouncement_clears_suspicion() -> None:
    """A suspected peer that re-announces is a candidate again."""
    table = PeerTable("s1", timings=Timings(suspect_after_failures=1))
    ann = announcement()
    offer(table, ann)
    table.report_failure(ann.peer_id, 0.0)
    assert table.candidates() == []
    offer(table, dataclasses.replace(ann, accuracy=0.9))
    assert [r.accuracy for r in table.candidates()] == [0.9]


def test_requesters_are_not_candidates_and_unknown_reports_are_ignored() -> None:
    """Requesters stay out of candidates(); reports about unknown peers do nothing."""
    table = PeerTable("s1")
    req = announcement(role="requester", variant="", model_sha256="", macs=0, accuracy=0.0)
    offer(table, req)
    assert len(table) == 1
    assert table.candidates() == []
    assert table.report_failure("0" * 20, 0.0) is None
    table.report_success("0" * 20)


def test_withdraw_removes_and_listener_errors_are_contained() -> None:
    """A goodbye removes the peer; a listener that raises is logged, not propagated."""
    table = PeerTable("s1")

    def broken(_event: PeerEvent, _record: PeerRecord) -> None:
        raise RuntimeError("listener bug")

    unsubscribe = table.add_listener(broken)
    ann = announcement()
    with capture_logs() as logs:
        offer(table, ann)
        assert table.withdraw(service(ann.peer_id)) is not None
    assert ann.peer_id not in table
    assert [e["event"] for e in logs].count("peer_listener_failed") == 2
    unsubscribe()
    assert table.withdraw(service(ann.peer_id)) is None


def test_bad_swarm_name() -> None:
    """A table for an invalid swarm name is a ConfigError."""
    with pytest.raises(ConfigError, match="swarm"):
        PeerTable("no spaces")


async def test_wait_for_count_and_predicate() -> None:
    """wait_for returns once enough peers (or a predicate) are seen, without polling."""
    table = PeerTable("s1")
    anns = [announcement(variant=f"V{i}") for i in range(3)]

    async def feed() -> None:
        for ann in anns:
            await asyncio.sleep(0)
            offer(table, ann)

    feeder = asyncio.create_task(feed())
    await table.wait_for(2, timeout=WAIT_S)
    await table.wait_for(lambda t: t.variants() == {"V0", "V1", "V2"}, timeout=WAIT_S)
    await feeder


async def test_wait_for_times_out_with_what_was_seen() -> None:
    """wait_for raises DiscoveryTimeoutError saying what it saw."""
    table = PeerTable("s1")
    offer(table, announcement(variant="V7"))
    with pytest.raises(DiscoveryTimeoutError, match=r"1 peers, variants \['V7'\]"):
        await table.wait_for(2, timeout=0.05)
    with pytest.raises(ConfigError):
        await table.wait_for(True, timeout=1)
