"""How far this requester trusts each peer, learned from how often it agrees.

After every decision the requester records, for each peer that answered, whether the
peer's top-1 matched the decided label. A peer's score is an exponentially weighted
moving average of those outcomes (``EWMA_ALPHA`` per observation, so roughly the last
``1 / EWMA_ALPHA`` answers count), and it drifts back toward a neutral ``PRIOR_SCORE``
with a half-life (``config.Timings.reputation_half_life_s``): a peer that misbehaved long
ago, or was simply unlucky, is forgiven. The count of observations decays with the same
half-life, so old evidence also stops being enough to exclude.

The weight a vote gives a peer compares its score with a reference, the median score of
the peers in the book (or ``PRIOR_SCORE`` if that is higher, so that a swarm of two or a
peer alone is judged against the prior):

- at most ``SOFT_GAP`` below the reference: weight 1.0 (the spread of honest variants
  whose accuracies differ by a few points stays well inside this);
- further below: the weight falls linearly, reaching ``MIN_WEIGHT`` at ``EXCLUDE_GAP``;
- ``EXCLUDE_GAP`` or more below, with at least ``MIN_OBSERVATIONS`` (decayed)
  observations: weight 0, the peer is excluded from votes. With fewer observations it
  keeps ``MIN_WEIGHT``: a handful of disagreements is not proof.

An excluded peer's answers should still be recorded (they count for nothing in the vote
but show whether it agrees again), so it can earn its weight back; time alone also
restores it. Unknown peers weigh 1.0. The math takes the time as an argument; ``clock`` (wall time,
since scores are saved and reloaded across restarts) only supplies it when omitted.
The table is bounded: past ``max_peers`` the least recently seen peer is forgotten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from swarm import config
from swarm.errors import ConfigError
from swarm.log import get_logger

log = get_logger(__name__)

FILE_VERSION: Final = 1
PRIOR_SCORE: Final = 0.9
# About the last 20 answers count. An honest peer agreeing 93% of the time then scores
# within ~0.04 (one standard deviation) of its mean, so SOFT_GAP is ~5 sigma, and it
# takes ~10 disagreements in a row to reach EXCLUDE_GAP: a lying peer gets there after
# about 10-12 requests, an honest one practically never.
EWMA_ALPHA: Final = 0.05
SOFT_GAP: Final = 0.2
EXCLUDE_GAP: Final = 0.4
MIN_WEIGHT: Final = 0.25
MIN_OBSERVATIONS: Final = 10.0
_MAX_PEER_ID_LEN: Final = 64


@dataclasses.dataclass(slots=True)
class _Entry:
    score: float
    observations: float
    updated_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class PeerReputation:
    """A peer's standing at one moment, for status pages and metrics."""

    peer_id: str
    score: float
    observations: float
    weight: float


class ReputationBook:
    """Per-peer agreement scores and the vote weights derived from them."""

    __slots__ = ("_clock", "_entries", "_half_life_s", "_max_peers")

    def __init__(
        self,
        *,
        half_life_s: float = config.DEFAULT_TIMINGS.reputation_half_life_s,
        max_peers: int = config.MAX_PEERS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be positive, got {half_life_s}")
        if max_peers < 1:
            raise ValueError(f"max_peers must be positive, got {max_peers}")
        self._half_life_s = half_life_s
        self._max_peers = max_peers
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    def __repr__(self) -> str:
        return f"ReputationBook(peers={len(self._entries)}, half_life_s={self._half_life_s})"

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _decayed(self, entry: _Entry, now: float) -> tuple[float, float]:
        """(score, observations) of ``entry`` at ``now``, relaxed toward the prior."""
        elapsed = max(0.0, now - entry.updated_at)  # a clock stepping back decays nothing
        keep = 0.5 ** (elapsed / self._half_life_s)
        return PRIOR_SCORE + (entry.score - PRIOR_SCORE) * keep, entry.observations * keep

    def record(self, peer_id: str, agreed: bool, now: float | None = None) -> None:
        """Count one answer of ``peer_id``: whether its top-1 matched the decision."""
        t = self._now(now)
        entry = self._entries.pop(peer_id, None)
        score, observations = (PRIOR_SCORE, 0.0) if entry is None else self._decayed(entry, t)
        score += EWMA_ALPHA * ((1.0 if agreed else 0.0) - score)
        self._entries[peer_id] = _Entry(score, observations + 1.0, t)
        while len(self._entries) > self._max_peers:
            evicted, _ = self._entries.popitem(last=False)
            log.debug("reputation_evicted", peer_id=evicted)

    def forget(self, peer_id: str) -> None:
        """Drop everything known about ``peer_id``."""
        self._entries.pop(peer_id, None)

    def score(self, peer_id: str, now: float | None = None) -> float:
        """The agreement score of ``peer_id`` in [0, 1]; ``PRIOR_SCORE`` if unknown."""
        entry = self._entries.get(peer_id)
        return PRIOR_SCORE if entry is None else self._decayed(entry, self._now(now))[0]

    def observations(self, peer_id: str, now: float | None = None) -> float:
        """How many answers of ``peer_id`` are on record, decayed with the half-life."""
        entry = self._entries.get(peer_id)
        return 0.0 if entry is None else self._decayed(entry, self._now(now))[1]

    def reference(self, now: float | None = None) -> float:
        """The score peers are compared with: the median, or the prior if higher."""
        t = self._now(now)
        scores = sorted(self._decayed(entry, t)[0] for entry in self._entries.values())
        if not scores:
            return PRIOR_SCORE
        mid = len(scores) // 2
        median = scores[mid] if len(scores) % 2 else (scores[mid - 1] + scores[mid]) / 2
        return max(median, PRIOR_SCORE)

    def weight(self, peer_id: str, now: float | None = None) -> float:
        """The vote weight of ``peer_id`` in [0, 1]: 1.0 unless it sits far below the rest."""
        t = self._now(now)
        return self._weight(peer_id, t, self.reference(t))

    def weights(self, peer_ids: Iterable[str], now: float | None = None) -> dict[str, float]:
        """``weight`` of several peers at once (the reference is computed once)."""
        t = self._now(now)
        reference = self.reference(t)
        return {peer_id: self._weight(peer_id, t, reference) for peer_id in peer_ids}

    def is_excluded(self, peer_id: str, now: float | None = None) -> bool:
        """True if ``peer_id``'s answers are left out of votes (weight 0)."""
        return self.weight(peer_id, now) == 0.0

    def _weight(self, peer_id: str, now: float, reference: float) -> float:
        entry = self._entries.get(peer_id)
        if entry is None:
            return 1.0
        score, observations = self._decayed(entry, now)
        gap = reference - score
        if gap <= SOFT_GAP:
            return 1.0
        if gap >= EXCLUDE_GAP and observations >= MIN_OBSERVATIONS:
            return 0.0
        slope = (1.0 - MIN_WEIGHT) / (EXCLUDE_GAP - SOFT_GAP)
        return max(MIN_WEIGHT, 1.0 - slope * (gap - SOFT_GAP))

    def snapshot(self, now: float | None = None) -> list[PeerReputation]:
        """Every peer's standing, least recently seen first."""
        t = self._now(now)
        reference = self.reference(t)
        out: list[PeerReputation] = []
        for peer_id, entry in self._entries.items():
            score, observations = self._decayed(entry, t)
            out.append(
                PeerReputation(peer_id, score, observations, self._weight(peer_id, t, reference))
            )
        return out

    def save(self, path: Path) -> None:
        """Write the book to ``path`` atomically (a temporary file, then ``os.replace``)."""
        doc = {
            "version": FILE_VERSION,
            "peers": [
                {
                    "peer_id": peer_id,
                    "score": entry.score,
                    "observations": entry.observations,
                    "updated_at": entry.updated_at,
                }
                for peer_id, entry in self._entries.items()
            ],
        }
        tmp: Path | None = None
        try:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            tmp = Path(name)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            raise ConfigError(
                f"cannot save reputations to {path}: {exc.strerror}; choose a writable "
                "data directory"
            ) from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        half_life_s: float = config.DEFAULT_TIMINGS.reputation_half_life_s,
        max_peers: int = config.MAX_PEERS,
        clock: Callable[[], float] = time.time,
    ) -> ReputationBook:
        """The book saved at ``path``; a fresh one if it is missing, unreadable or corrupt."""
        book = cls(half_life_s=half_life_s, max_peers=max_peers, clock=clock)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return book
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("reputation_load_failed", path=str(path), error=str(exc))
            return book
        try:
            entries = _parse_book(text)
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            log.warning("reputation_load_failed", path=str(path), error=str(exc))
            return book
        # Keep the most recently seen peers if the file holds more than the table may.
        for peer_id, entry in entries[-max_peers:]:
            book._entries[peer_id] = entry
        return book


def _parse_book(text: str) -> list[tuple[str, _Entry]]:
    doc: Any = json.loads(text, parse_constant=_reject_constant)
    if type(doc) is not dict or doc.get("version") != FILE_VERSION:
        raise ValueError(f"not a reputation file of version {FILE_VERSION}")
    entries: list[tuple[str, _Entry]] = []
    seen: set[str] = set()
    peers = doc["peers"]
    if type(peers) is not list:
        raise TypeError("'peers' must be a list")
    for item in peers:
        peer_id = item["peer_id"]
        if type(peer_id) is not str or not 0 < len(peer_id) <= _MAX_PEER_ID_LEN:
            raise ValueError(f"bad peer id {peer_id!r}")
        if peer_id in seen:
            raise ValueError(f"peer {peer_id} appears twice")
        seen.add(peer_id)
        score = _number(item["score"])
        observations = _number(item["observations"])
        if not 0.0 <= score <= 1.0 or observations < 0.0:
            raise ValueError(f"peer {peer_id}: score or observations out of range")
        entries.append((peer_id, _Entry(score, observations, _number(item["updated_at"]))))
    return entries


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _reject_constant(text: str) -> float:
    raise ValueError(f"{text} is not a number")
