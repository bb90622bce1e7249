"""An oracle for ``swarm.decision.voting``: the voting rules written with numpy arrays.

A verbatim copy of the vote's arithmetic before it moved to plain floats (on the same
``Ballot`` and ``Decision``): an independent implementation whose results must be
bit-for-bit those of ``swarm.decision.voting`` (``tests/swarm/test_voting_oracle.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from swarm import config
from swarm.decision.voting import Ballot, Decision
from swarm.errors import ConfigError, NoDecisionError

RULES: Final = ("robust", "sum", "vote", "trimmed", "median")
DEFAULT_RULE: Final = "robust"
# Scores this close are a tie. Scores are sums of at most MAX_PEERS probabilities, so
# float error stays below 1e-12; the certificate keeps half this margin on each side.
TIE_EPS: Final = 1e-9

_Array = npt.NDArray[np.float64]


@dataclasses.dataclass(frozen=True, slots=True)
class _Tally:
    values: _Array  # (n, num_classes), absent classes 0
    weights: _Array  # (n,), all > 0
    top1: npt.NDArray[np.int64]  # (n,), -1 for an empty top-k
    used: tuple[str, ...]
    excluded: tuple[str, ...]


def robust_trim(n: int) -> int:
    """The ``robust`` rule's trim for ``n`` ballots: one less than the largest minority."""
    return max(0, (n - 1) // 2 - 1)


def trimmed_trim(n: int) -> int:
    """The ``trimmed`` rule's default trim: the largest f with n >= 3f + 1."""
    return max(0, (n - 1) // 3)


def decide(
    ballots: Sequence[Ballot],
    rule: str = DEFAULT_RULE,
    *,
    num_classes: int = config.NUM_CLASSES,
    trim: int | None = None,
) -> Decision:
    """Combine ``ballots`` under ``rule``; ``NoDecisionError`` if none can be counted."""
    _check_rule(rule, trim)
    tally = _tally(ballots, num_classes)
    if not tally.used:
        raise NoDecisionError("no ballot to count: every ballot has weight 0 or none arrived")
    scores = _scores(tally, rule, trim)
    label = _winner(scores)
    others = np.delete(scores, label)
    total = float(scores.sum())
    return Decision(
        label=label,
        confidence=float(scores[label]) / total if total > 0 else 0.0,
        scores=tuple(float(s) for s in scores),
        rule=rule,
        certified_f=_certified_f(tally, rule, trim, label),
        margin=float(scores[label] - others.max()) if others.size else 0.0,
        used=tally.used,
        excluded=tally.excluded,
    )


def can_change(
    ballots: Sequence[Ballot],
    missing: int,
    rule: str = DEFAULT_RULE,
    *,
    num_classes: int = config.NUM_CLASSES,
    trim: int | None = None,
    missing_weight: float | None = None,
) -> bool:
    """True if up to ``missing`` more ballots, with any content, could change the label.

    ``missing_weight`` bounds the weight of each ballot still to come (``robust`` only);
    by default the largest of 1.0 and the weights seen. Once this is False the requester
    can stop waiting: no reply still out can change the answer.
    """
    _check_rule(rule, trim)
    if missing < 0:
        raise ValueError(f"missing must be >= 0, got {missing}")
    tally = _tally(ballots, num_classes)
    if not tally.used:
        return missing > 0
    label = _winner(_scores(tally, rule, trim))
    heaviest = max(1.0, float(tally.weights.max()))
    weight = heaviest if missing_weight is None else missing_weight
    # Any number of the missing ballots may arrive: the trim depends on how many did.
    return any(
        not _holds(tally, rule, trim, label, added=j, added_weight=weight)
        for j in range(1, missing + 1)
    )


def _check_rule(rule: str, trim: int | None) -> None:
    if rule not in RULES:
        raise ConfigError(f"unknown voting rule {rule!r}: use one of {', '.join(RULES)}")
    if trim is not None:
        if rule not in ("trimmed", "robust"):
            raise ConfigError(f"trim applies to the 'trimmed' and 'robust' rules, not {rule!r}")
        if trim < 0:
            raise ConfigError(f"trim must be >= 0, got {trim}")


def _tally(ballots: Sequence[Ballot], num_classes: int) -> _Tally:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    rows: list[_Array] = []
    weights: list[float] = []
    top1: list[int] = []
    used: list[str] = []
    excluded: list[str] = []
    seen: set[str] = set()
    for ballot in ballots:
        if ballot.peer_id in seen:
            raise ValueError(f"two ballots from peer {ballot.peer_id}: count each peer once")
        seen.add(ballot.peer_id)
        if not (math.isfinite(ballot.weight) and ballot.weight >= 0):
            raise ValueError(f"ballot of {ballot.peer_id}: weight must be finite and >= 0")
        classes = [cls for cls, _ in ballot.topk]
        if len(set(classes)) != len(classes) or not all(
            isinstance(cls, int | np.integer) and 0 <= cls < num_classes and 0.0 <= prob <= 1.0
            for cls, prob in ballot.topk
        ):
            raise ValueError(
                f"ballot of {ballot.peer_id}: classes must be distinct in [0, {num_classes}) "
                f"with probabilities in [0, 1], got {ballot.topk}"
            )
        if ballot.weight == 0:
            excluded.append(ballot.peer_id)
            continue
        row = np.zeros(num_classes)
        for cls, prob in ballot.topk:
            row[cls] = prob
        rows.append(row)
        weights.append(ballot.weight)
        # Top-1: the most probable listed class, ties to the lower index.
        ranked = sorted(ballot.topk, key=lambda entry: (-entry[1], entry[0]))
        top1.append(ranked[0][0] if ranked else -1)
        used.append(ballot.peer_id)
    return _Tally(
        values=np.array(rows) if rows else np.zeros((0, num_classes)),
        weights=np.array(weights, dtype=np.float64),
        top1=np.array(top1, dtype=np.int64),
        used=tuple(used),
        excluded=tuple(excluded),
    )


def _winner(scores: _Array) -> int:
    best = float(scores.max())
    return int(np.flatnonzero(scores >= best - TIE_EPS)[0])


def _cut(rule: str, trim: int | None, n: int, total: float) -> float:
    """The weight mass a rule cuts from each tail of a class's n values (weight total)."""
    if rule == "robust":
        t = robust_trim(n) if trim is None else min(trim, (n - 1) // 2)
        return total * t / n
    if rule == "median":
        return (n - 1) / 2
    if rule == "trimmed":
        return float(trimmed_trim(n) if trim is None else min(trim, (n - 1) // 2))
    return 0.0


def _aggregate(values: _Array, weights: _Array, cut: float, rule: str) -> float:
    """A class's score: the sum, or the weighted mean left after cutting ``cut`` per tail."""
    if rule == "sum":
        # Sorted first so the float result does not depend on the order replies arrived.
        return float(np.sort(values * weights).sum())
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    upper = np.cumsum(w)
    lower = upper - w
    kept = np.clip(np.minimum(upper, upper[-1] - cut) - np.maximum(lower, cut), 0.0, None)
    return float((kept * v).sum() / kept.sum())


def _rule_weights(tally: _Tally, rule: str) -> _Array:
    return tally.weights if rule == "robust" else np.ones_like(tally.weights)


def _scores(tally: _Tally, rule: str, trim: int | None) -> _Array:
    num_classes = tally.values.shape[1]
    if rule == "vote":
        return np.bincount(tally.top1[tally.top1 >= 0], minlength=num_classes).astype(float)
    weights = _rule_weights(tally, rule)
    cut = _cut(rule, trim, len(weights), float(weights.sum()))
    return np.array(
        [_aggregate(tally.values[:, c], weights, cut, rule) for c in range(num_classes)]
    )


def _shift(values: _Array, weights: _Array, mass: float, to: float) -> tuple[_Array, _Array]:
    """Move ``mass`` of weight onto the value ``to`` from the values furthest from it."""
    order = np.argsort(values, kind="stable")
    if to == 0.0:
        order = order[::-1]
    v, w = values[order], weights[order]
    taken = np.clip(mass - (np.cumsum(w) - w), 0.0, w)
    return np.append(v, to), np.append(w - taken, taken.sum())


def _holds(
    tally: _Tally,
    rule: str,
    trim: int | None,
    label: int,
    *,
    replaced: int = 0,
    added: int = 0,
    added_weight: float = 1.0,
) -> bool:
    """Whether ``label`` surely survives ``replaced`` ballots replaced and ``added`` more."""
    num_classes = tally.values.shape[1]
    lower = np.empty(num_classes)
    upper = np.empty(num_classes)
    if rule == "vote":
        counts = np.bincount(tally.top1[tally.top1 >= 0], minlength=num_classes)
        lower[:] = max(0, int(counts[label]) - replaced)
        upper[:] = counts + replaced + added
    else:
        weights = _rule_weights(tally, rule)
        # Replaced ballots keep their weight: at most the r largest weights are moved.
        moved = float(np.sort(weights)[::-1][:replaced].sum())
        extra = added * (added_weight if rule == "robust" else 1.0)
        cut = _cut(rule, trim, len(weights) + added, float(weights.sum()) + extra)
        for c in range(num_classes):
            # The winner's worst case pushes it to 0, a contender's to 1; added ballots
            # sit at the same extreme as the moved mass.
            to = 0.0 if c == label else 1.0
            v, w = _shift(tally.values[:, c], weights, moved, to)
            w[-1] += extra
            (lower if c == label else upper)[c] = _aggregate(v, w, cut, rule)
    for c in range(num_classes):
        if c == label:
            continue
        diff = float(lower[label] - upper[c])
        # A lower index wins ties: against one the winner needs a clear lead.
        if (c < label and diff <= 1.5 * TIE_EPS) or (c > label and diff < -0.5 * TIE_EPS):
            return False
    return True


def _certified_f(tally: _Tally, rule: str, trim: int | None, label: int) -> int:
    """The largest r whose replacement provably cannot change ``label``.

    ``_holds`` is monotone in r (bounds only loosen), so a binary search finds it.
    """
    lo, hi = 0, len(tally.used)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _holds(tally, rule, trim, label, replaced=mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
