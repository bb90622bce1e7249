"""Tests of peer reputations: scoring, decay, weights, exclusion, bounds and persistence."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from swarm.decision.reputation import (
    EWMA_ALPHA,
    EXCLUDE_GAP,
    FILE_VERSION,
    MIN_OBSERVATIONS,
    MIN_WEIGHT,
    PRIOR_SCORE,
    SOFT_GAP,
    ReputationBook,
)
from swarm.errors import ConfigError

HALF_LIFE = 100.0


@pytest.fixture
def book() -> ReputationBook:
    """A book with a 100 s half-life whose clock must never be consulted."""

    def no_clock() -> float:
        raise AssertionError("the time should have been passed in")

    return ReputationBook(half_life_s=HALF_LIFE, clock=no_clock)


def _with_honest_peers(book: ReputationBook, now: float, count: int = 4) -> None:
    for i in range(count):
        for _ in range(30):
            book.record(f"honest{i}", True, now)


def test_unknown_peer_is_neutral(book: ReputationBook) -> None:
    """A peer never seen scores the prior, has no observations and full weight."""
    assert book.score("new", 0.0) == PRIOR_SCORE
    assert book.observations("new", 0.0) == 0.0
    assert book.weight("new", 0.0) == 1.0
    assert not book.is_excluded("new", 0.0)
    assert "new" not in book


def test_record_is_an_ewma_of_agreement(book: ReputationBook) -> None:
    """Each record moves the score EWMA_ALPHA of the way toward 1 (agreed) or 0."""
    book.record("p", False, 0.0)
    assert book.score("p", 0.0) == pytest.approx(PRIOR_SCORE * (1 - EWMA_ALPHA))
    book.record("p", True, 0.0)
    expected = PRIOR_SCORE * (1 - EWMA_ALPHA) ** 2 + EWMA_ALPHA
    assert book.score("p", 0.0) == pytest.approx(expected)
    assert book.observations("p", 0.0) == 2.0


def test_score_decays_toward_prior_with_half_life(book: ReputationBook) -> None:
    """After one half-life, half the distance to the prior (and half the evidence) is gone."""
    for _ in range(20):
        book.record("p", False, 0.0)
    low = book.score("p", 0.0)
    assert book.score("p", HALF_LIFE) == pytest.approx(PRIOR_SCORE + (low - PRIOR_SCORE) / 2)
    assert book.observations("p", HALF_LIFE) == pytest.approx(10.0)
    assert book.score("p", 50 * HALF_LIFE) == pytest.approx(PRIOR_SCORE, abs=1e-9)


def test_clock_going_backwards_decays_nothing(book: ReputationBook) -> None:
    """A time earlier than the last record is treated as no time passed."""
    book.record("p", False, 1000.0)
    assert book.score("p", 0.0) == book.score("p", 1000.0)


def test_clock_is_used_only_when_no_time_is_given() -> None:
    """Without an explicit time, the injected clock supplies it."""
    now = [0.0]
    book = ReputationBook(half_life_s=HALF_LIFE, clock=lambda: now[0])
    for _ in range(20):
        book.record("p", False)
    low = book.score("p")
    now[0] = HALF_LIFE
    assert book.score("p") == pytest.approx(PRIOR_SCORE + (low - PRIOR_SCORE) / 2)
    assert book.score("p", 0.0) == pytest.approx(low)


def test_honest_peers_keep_full_weight(book: ReputationBook) -> None:
    """Peers agreeing most of the time (a few misses) keep weight 1.0."""
    _with_honest_peers(book, 0.0)
    for _ in range(3):
        book.record("honest0", False, 0.0)
    assert book.score("honest0", 0.0) > PRIOR_SCORE - SOFT_GAP
    assert book.weights([f"honest{i}" for i in range(4)], 0.0) == dict.fromkeys(
        [f"honest{i}" for i in range(4)], 1.0
    )


def test_peer_below_the_others_is_down_weighted_before_exclusion(book: ReputationBook) -> None:
    """A few disagreements lower the weight; too few observations never exclude."""
    _with_honest_peers(book, 0.0)
    weights = []
    for _ in range(int(MIN_OBSERVATIONS) - 1):
        book.record("liar", False, 0.0)
        weights.append(book.weight("liar", 0.0))
    assert weights == sorted(weights, reverse=True)
    assert any(MIN_WEIGHT < w < 1.0 for w in weights)
    assert weights[-1] == MIN_WEIGHT  # far below, but only 9 observations
    assert not book.is_excluded("liar", 0.0)


def test_persistent_liar_is_excluded_then_forgiven(book: ReputationBook) -> None:
    """Enough disagreements far below the median exclude; time restores the peer."""
    _with_honest_peers(book, 0.0)
    for _ in range(int(MIN_OBSERVATIONS)):
        book.record("liar", False, 0.0)
    assert book.reference(0.0) - book.score("liar", 0.0) >= EXCLUDE_GAP
    assert book.is_excluded("liar", 0.0)
    assert book.weight("liar", 0.0) == 0.0
    assert book.weight("liar", 10 * HALF_LIFE) == 1.0


def test_lone_liar_is_judged_against_the_prior(book: ReputationBook) -> None:
    """With no other peers on record, the reference is the prior, so a liar is still excluded."""
    for _ in range(20):
        book.record("liar", False, 0.0)
    assert book.reference(0.0) == PRIOR_SCORE
    assert book.is_excluded("liar", 0.0)


def test_reference_is_the_median_when_above_prior(book: ReputationBook) -> None:
    """The reference follows the median of scores, but never drops below the prior."""
    _with_honest_peers(book, 0.0, count=3)
    high = book.score("honest0", 0.0)
    assert high > PRIOR_SCORE
    assert book.reference(0.0) == pytest.approx(high)
    for peer in ("x", "y", "z", "w"):
        for _ in range(5):
            book.record(peer, False, 0.0)
    assert book.reference(0.0) == PRIOR_SCORE


def test_table_evicts_least_recently_seen() -> None:
    """Past max_peers, the peer recorded longest ago is forgotten first."""
    book = ReputationBook(half_life_s=HALF_LIFE, max_peers=2)
    book.record("a", False, 0.0)
    book.record("b", False, 1.0)
    book.record("a", False, 2.0)
    book.record("c", False, 3.0)
    assert "b" not in book
    assert "a" in book
    assert "c" in book
    assert len(book) == 2


def test_forget_drops_a_peer(book: ReputationBook) -> None:
    """forget returns a peer to neutral."""
    book.record("p", False, 0.0)
    book.forget("p")
    assert "p" not in book
    assert book.score("p", 0.0) == PRIOR_SCORE


def test_snapshot_lists_standing(book: ReputationBook) -> None:
    """snapshot reports each peer's score, observations and weight, oldest first."""
    book.record("a", True, 0.0)
    book.record("b", False, 1.0)
    snap = book.snapshot(1.0)
    assert [entry.peer_id for entry in snap] == ["a", "b"]
    assert snap[1].observations == 1.0
    assert snap[0].weight == 1.0


def test_save_then_load_roundtrips(tmp_path: Path, book: ReputationBook) -> None:
    """A saved book loads back with the same scores, observations and recency order."""
    _with_honest_peers(book, 0.0, count=2)
    for _ in range(12):
        book.record("liar", False, 5.0)
    path = tmp_path / "reputation.json"
    book.save(path)
    loaded = ReputationBook.load(path, half_life_s=HALF_LIFE, clock=lambda: 5.0)
    assert [e.peer_id for e in loaded.snapshot()] == ["honest0", "honest1", "liar"]
    for peer in ("honest0", "honest1", "liar"):
        assert loaded.score(peer, 50.0) == pytest.approx(book.score(peer, 50.0))
        assert loaded.observations(peer, 50.0) == pytest.approx(book.observations(peer, 50.0))
    assert loaded.is_excluded("liar", 5.0)
    assert json.loads(path.read_text())["version"] == FILE_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["reputation.json"]


def test_save_is_atomic_when_replace_fails(
    tmp_path: Path, book: ReputationBook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed rename leaves the old file intact and no temp; ConfigError names the file."""
    path = tmp_path / "reputation.json"
    book.record("old", True, 0.0)
    book.save(path)
    before = path.read_bytes()
    book.record("new", True, 1.0)

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ConfigError, match=r"reputation\.json"):
        book.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["reputation.json"]


def test_load_missing_file_starts_fresh_quietly(tmp_path: Path) -> None:
    """No file yet is the normal first start: an empty book, no warning."""
    with capture_logs() as logs:
        book = ReputationBook.load(tmp_path / "none.json")
    assert len(book) == 0
    assert logs == []


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({"version": 99, "peers": []}).encode(),
        json.dumps({"version": 1, "peers": {}}).encode(),
        json.dumps({"version": 1, "peers": [{"peer_id": "a"}]}).encode(),
        json.dumps(
            {
                "version": 1,
                "peers": [{"peer_id": "a", "score": 2, "observations": 1, "updated_at": 0}],
            }
        ).encode(),
        b'{"version": 1, "peers": [{"peer_id": "a", "score": NaN, "observations": 1, '
        b'"updated_at": 0}]}',
        json.dumps(
            {
                "version": 1,
                "peers": [{"peer_id": "a", "score": 0.5, "observations": "1", "updated_at": 0}],
            }
        ).encode(),
    ],
)
def test_load_corrupt_file_starts_fresh_with_warning(tmp_path: Path, content: bytes) -> None:
    """A corrupt or foreign file never crashes: an empty book and a warning event."""
    path = tmp_path / "reputation.json"
    path.write_bytes(content)
    with capture_logs() as logs:
        book = ReputationBook.load(path)
    assert len(book) == 0
    assert [(e["event"], e["log_level"]) for e in logs] == [("reputation_load_failed", "warning")]


def test_load_keeps_only_max_peers_most_recent(tmp_path: Path, book: ReputationBook) -> None:
    """A file with more peers than allowed keeps the most recently seen ones."""
    for i in range(5):
        book.record(f"p{i}", True, float(i))
    path = tmp_path / "reputation.json"
    book.save(path)
    loaded = ReputationBook.load(path, max_peers=2)
    assert [e.peer_id for e in loaded.snapshot(10.0)] == ["p3", "p4"]


@pytest.mark.parametrize("kwargs", [{"half_life_s": 0.0}, {"max_peers": 0}])
def test_constructor_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    """A non-positive half-life or table size is refused."""
    with pytest.raises(ValueError, match="must be positive"):
        ReputationBook(**kwargs)  # type: ignore[arg-type]
