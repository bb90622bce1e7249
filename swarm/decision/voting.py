"""Combining the peers' top-k replies into one decision, and how far to trust it.

Every ballot is one peer's top-k: a few (class, probability) pairs, the other classes
counting 0. The rules, given ``n`` ballots:

``sum``
    The Variant Parallelism paper's rule (Asadi & Goudarzi 2023): each class scores the
    sum of its probabilities over the ballots. Accurate, but one liar shifts a score by
    up to 1.
``vote``
    Plurality of the ballots' top-1 classes.
``trimmed``
    Per class, the mean of the ballots' values after dropping the ``trim`` lowest and
    ``trim`` highest (coordinate-wise trimmed mean, Yin et al., ICML 2018: it tolerates
    f < n/2 liars as long as trim >= f). Default trim ``floor((n - 1) / 3)``: the
    classical Byzantine bound n >= 3f + 1, which keeps most ballots in the mean.
``median``
    Per class, the median of the ballots' values (Yin et al.'s coordinate-wise median).
``robust`` (the default)
    Per class, a *weighted* trimmed mean: ballots count with their weights (the
    requester's variant accuracy x peer reputation), and a share ``t / n`` of the total
    weight is cut from each tail, splitting a ballot at the edge when needed. The trim
    adapts to ``n``: ``t = max(0, floor((n - 1) / 2) - 1)``, one less than the largest
    minority ``f_max = floor((n - 1) / 2)``. So up to ``t`` liars are cut out entirely,
    and even ``f_max`` liars keep at most one ballot's worth of extreme values among the
    3 (n odd) or 4 (n even) central ballots that are averaged. Guarantee: if every
    honest ballot gives the honest class at least p and the liars' class at most q, with
    p - q > 1/2 (n odd) or 1/3 (n even), any minority of liars naming their class with
    probability 1.0 cannot flip the decision; ``sum`` needs p - q > f / (n - f), which
    for 3 liars of 7 is 3/4. Clean case: with n <= 4 nothing is trimmed and the rule is
    the weighted mean, as accurate as ``sum``; with more ballots it averages the central
    3 (n odd) or 4 (n even) ballots per class rather than the median's one, which keeps
    it within about a point of ``sum`` on a synthetic ensemble (see the tests) and ahead
    of ``median`` and ``vote``. A caller who trusts more of the swarm can pass a smaller
    ``trim`` (liars up to ``trim`` are still cut out entirely).

Zero-weight ballots are left out by every rule (``Decision.excluded``); only ``robust``
uses the weights' values. Ties, and scores within ``TIE_EPS`` of each other, go to the
lowest class index.

Certificate. Every rule but ``vote`` scores each class by a functional of that class's
weighted values that is monotone: raising one ballot's value never lowers the score. So
to bound what replacing r ballots can do against the winner w and a contender c, let the
r ballots most favourable to w drop w to 0, and the r most favourable to c raise c to 1;
with weights, move that much weight mass (the r largest weights) from the top of w's
values to 0 and from the bottom of c's values to 1. No real choice of r ballots does
worse: moving the top mass down gives the lowest possible distribution of w's values at
every threshold. Taking different ballots per class only makes the bound more
conservative. ``certified_f`` is the largest r for which the lower bound of w beats the
upper bound of every c (respecting the tie rule, with a float margin); it is sound, never
overstated, and often tight. Its search skips the bounds for any r whose r largest
weights outweigh the rest: those r ballots surely carry a contender past the winner (3
agreeing ballots of equal weight, the common case, get r = 1 at the cost of
one check). The contenders are first bounded all at once, by the column
of each ballot's largest value for any of them: a score is monotone in its column, so if
w clearly beats that bound it beats each contender, and only otherwise is each bounded on
its own (the same answer either way). ``vote`` uses counts: r ballots take r votes from w
and give them to c. ``can_change`` applies the same bounds to ``missing`` ballots still to
come, for every number of them that may arrive, at the largest weight they may carry.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Final

import numpy as np

from swarm import config
from swarm.errors import ConfigError, NoDecisionError

RULES: Final = ("robust", "sum", "vote", "trimmed", "median")
DEFAULT_RULE: Final = "robust"
# Scores this close are a tie. Scores are sums of at most MAX_PEERS probabilities, so
# float error stays below 1e-12; the certificate keeps half this margin on each side.
TIE_EPS: Final = 1e-9


@dataclasses.dataclass(frozen=True, slots=True)
class Ballot:
    """One verified reply: a peer's top-k, as (class, probability in [0, 1]) pairs."""

    peer_id: str
    variant: str
    topk: tuple[tuple[int, float], ...]
    weight: float = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a vote.

    ``scores`` holds each class's aggregate under ``rule`` (for ``vote``: counts).
    ``confidence`` is the winner's share of the summed scores, in [0, 1]. ``margin`` is
    the winner's score minus the best other score. ``certified_f`` is how many of the
    ``used`` ballots could be replaced by arbitrary ones without changing ``label``.
    """

    label: int
    confidence: float
    scores: tuple[float, ...]
    rule: str
    certified_f: int
    margin: float
    used: tuple[str, ...]
    excluded: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class _Tally:
    columns: tuple[list[float], ...]  # per class, each used ballot's value (absent: 0)
    keys: tuple[bytes, ...]  # per class, its column's exact bits: equal keys, equal scores
    weights: list[float]  # per used ballot, all > 0
    top1: list[int]  # per used ballot, -1 for an empty top-k
    named: tuple[int, ...]  # the classes some used ballot lists, ascending
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
    others = scores[:label] + scores[label + 1 :]
    total = _sum(scores)
    return Decision(
        label=label,
        confidence=scores[label] / total if total > 0 else 0.0,
        scores=tuple(scores),
        rule=rule,
        certified_f=_certified_f(tally, rule, trim, label),
        margin=scores[label] - max(others) if others else 0.0,
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
    heaviest = max(1.0, *tally.weights)
    weight = heaviest if missing_weight is None else missing_weight
    if _outweighed(tally, rule, missing, weight):
        return True
    return _can_change(tally, rule, trim, missing, weight)


def _outweighed(tally: _Tally, rule: str, missing: int, weight: float) -> bool:
    """Whether the ballots still to come outweigh those in, so that they surely can
    change the label: a cheap test that spares ``_can_change`` on most early replies.

    Every missing ballot naming a contender at 1.0 and the winner at 0 (the extremes
    ``_holds`` assumes) puts mass A = missing x weight at those values against the
    present mass P. A rule cuts less than half of the total T from each tail, so at
    least A - cut stays at 1.0 for the contender and at 0 for the winner: the
    contender's score exceeds the winner's by at least (A - P) / T, and ``_leads``
    gives way once that exceeds the tie tolerance. Not for ``vote``, which counts.
    """
    if rule == "vote":
        return False
    present = _sum(_rule_weights(tally, rule))
    added = missing * (weight if rule == "robust" else 1.0)
    return _outweighs(added, present)


def _outweighs(mass: float, rest: float) -> bool:
    """Whether weight ``mass`` at the extremes clearly outweighs ``rest``: by more than
    any tie rule or float error needs (``_outweighed``, ``_replaced_outweigh``)."""
    return mass - rest > 4 * TIE_EPS * max(1.0, mass + rest)


def _moved(weights: Sequence[float], replaced: int) -> float:
    """The weight ``replaced`` ballots can move: replaced ballots keep their weight, so
    at most the ``replaced`` largest weights."""
    return _sum(sorted(weights, reverse=True)[:replaced])


def _can_change(tally: _Tally, rule: str, trim: int | None, missing: int, weight: float) -> bool:
    label = _winner(_scores(tally, rule, trim))
    shifts = None if rule == "vote" else _Shifts(tally, _rule_weights(tally, rule), label, 0)
    # Any number of the missing ballots may arrive: the trim depends on how many did.
    # The most of them is checked first: when the label can change, it usually breaks
    # there, and the answer does not depend on the order.
    return any(
        not _holds(tally, rule, trim, label, added=j, added_weight=weight, shifts=shifts)
        for j in range(missing, 0, -1)
    )


def _check_rule(rule: str, trim: int | None) -> None:
    if rule not in RULES:
        raise ConfigError(f"unknown voting rule {rule!r}: use one of {', '.join(RULES)}")
    if trim is not None:
        if rule not in ("trimmed", "robust"):
            raise ConfigError(f"trim applies to the 'trimmed' and 'robust' rules, not {rule!r}")
        if trim < 0:
            raise ConfigError(f"trim must be >= 0, got {trim}")


def top_class(topk: Sequence[tuple[int, float]]) -> int:
    """A ballot's top-1: its most probable listed class, ties to the lower index; -1 for
    an empty top-k."""
    if not topk:
        return -1
    best, high = topk[0]
    for cls, prob in topk:  # a plain loop: a key function costs more than k comparisons
        if prob > high or (prob == high and cls < best):
            best, high = cls, prob
    return int(best)


def _tally(ballots: Sequence[Ballot], num_classes: int) -> _Tally:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    rows: list[tuple[tuple[int, float], ...]] = []
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
        _check_topk(ballot, num_classes)
        if ballot.weight == 0:
            excluded.append(ballot.peer_id)
            continue
        rows.append(ballot.topk)
        weights.append(float(ballot.weight))
        top1.append(top_class(ballot.topk))
        used.append(ballot.peer_id)
    # Classes no ballot names (most of them, with top-k ballots) share one column of
    # zeros; the rules only read columns.
    n = len(rows)
    named: dict[int, list[float]] = {}
    for i, topk in enumerate(rows):
        for cls, prob in topk:
            column = named.get(cls)
            if column is None:
                column = named[cls] = [0.0] * n
            column[i] = float(prob)
    zeros = [0.0] * n
    zeros_key = array.array("d", zeros).tobytes()
    columns = tuple([named.get(c, zeros) for c in range(num_classes)])
    keys = tuple(
        [
            array.array("d", named[c]).tobytes() if c in named else zeros_key
            for c in range(num_classes)
        ]
    )
    return _Tally(columns, keys, weights, top1, tuple(sorted(named)), tuple(used), tuple(excluded))


_INTEGERS: Final = (int, np.integer)


def _check_topk(ballot: Ballot, num_classes: int) -> None:
    classes: set[object] = set()
    for cls, prob in ballot.topk:
        if (
            cls in classes
            or (type(cls) is not int and not isinstance(cls, _INTEGERS))
            or not 0 <= cls < num_classes
            or not 0.0 <= prob <= 1.0
        ):
            raise ValueError(
                f"ballot of {ballot.peer_id}: classes must be distinct in [0, {num_classes}) "
                f"with probabilities in [0, 1], got {ballot.topk}"
            )
        classes.add(cls)


# The rules run on a handful of ballots and classes, where numpy's per-call overhead
# dwarfs the arithmetic: plain floats, summed in numpy's pairwise order so every score
# is bit-for-bit what ``numpy.sum`` would give.


def _sum(xs: Sequence[float]) -> float:
    """``float(numpy.sum(xs))`` of float64 values, in the same order of additions."""
    if len(xs) < 8:  # _pairwise's first case, without the call
        res = 0.0
        for x in xs:
            res += x
        return res
    return _pairwise(xs, 0, len(xs))


def _pairwise(xs: Sequence[float], start: int, n: int) -> float:
    # numpy's pairwise_sum (loops_utils.h): sequential below 8, 8 accumulators up to 128.
    if n < 8:
        res = 0.0
        for i in range(start, start + n):
            res += xs[i]
        return res
    if n <= 128:
        r = list(xs[start : start + 8])
        i = 8
        while i < n - n % 8:
            for j in range(8):
                r[j] += xs[start + i + j]
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for k in range(i, n):
            res += xs[start + k]
        return res
    half = n // 2
    half -= half % 8
    return _pairwise(xs, start, half) + _pairwise(xs, start + half, n - half)


def _cumsum(xs: Sequence[float]) -> list[float]:
    # numpy.cumsum's order: the first value as it is, then each partial sum plus the next.
    return list(itertools.accumulate(xs))


def _counts(top1: Sequence[int], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for cls in top1:
        if cls >= 0:
            counts[cls] += 1
    return counts


def _winner(scores: Sequence[float]) -> int:
    best = max(scores)
    return next(i for i, s in enumerate(scores) if s >= best - TIE_EPS)


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


def _aggregate(values: Sequence[float], weights: Sequence[float], cut: float, rule: str) -> float:
    """A class's score: the sum, or the weighted mean left after cutting ``cut`` per tail."""
    if rule == "sum":
        # Sorted first so the float result does not depend on the order replies arrived.
        return _sum(sorted(v * w for v, w in zip(values, weights, strict=True)))
    order = sorted(range(len(values)), key=values.__getitem__)  # stable, as argsort's
    v = [values[i] for i in order]
    w = [weights[i] for i in order]
    upper = _cumsum(w)
    top = upper[-1] - cut
    # max(min(u, top) - max(u - wi, cut), 0.0) for each value: the weight left between
    # the two cuts. Written out with the very comparisons min and max of two make (the
    # first argument wins a tie), so even the sign of a zero is theirs.
    kept: list[float] = []
    for u, wi in zip(upper, w, strict=True):
        lo = u - wi
        left = (top if top < u else u) - (cut if cut > lo else lo)
        kept.append(0.0 if left < 0.0 else left)
    den = _sum(kept)
    num = _sum([k * x for k, x in zip(kept, v, strict=True)])
    return num / den if den else math.nan


def _rule_weights(tally: _Tally, rule: str) -> list[float]:
    return tally.weights if rule == "robust" else [1.0] * len(tally.weights)


def _scores(tally: _Tally, rule: str, trim: int | None) -> list[float]:
    if rule == "vote":
        return [float(c) for c in _counts(tally.top1, len(tally.columns))]
    weights = _rule_weights(tally, rule)
    cut = _cut(rule, trim, len(weights), _sum(weights))
    # Classes no ballot names (most of them, with top-k ballots) share one column.
    memo: dict[bytes, float] = {}
    for key, column in zip(tally.keys, tally.columns, strict=True):
        if key not in memo:
            memo[key] = _aggregate(column, weights, cut, rule)
    return [memo[key] for key in tally.keys]


def _shift(
    values: Sequence[float], weights: Sequence[float], mass: float, to: float
) -> tuple[list[float], list[float]]:
    """Move ``mass`` of weight onto the value ``to`` from the values furthest from it."""
    order = sorted(range(len(values)), key=values.__getitem__)
    if to == 0.0:
        order.reverse()
    v = [values[i] for i in order]
    w = [weights[i] for i in order]
    # min(max(mass - (c - wi), 0.0), wi) for each, in min's and max's own comparisons.
    taken: list[float] = []
    for c, wi in zip(_cumsum(w), w, strict=True):
        x = mass - (c - wi)
        y = 0.0 if x < 0.0 else x
        taken.append(wi if wi < y else y)
    v.append(to)
    rest = [wi - t for wi, t in zip(w, taken, strict=True)]
    rest.append(_sum(taken))
    return v, rest


class _Shifts:
    """Per class, its values after the worst case of ``replaced`` ballots, on demand.

    The winner's worst case pushes it to 0, a contender's to 1. Computed once per
    distinct column, and only for the classes a check gets to.
    """

    __slots__ = ("_cache", "_ceiling", "label", "moved", "tally", "weights")

    def __init__(self, tally: _Tally, weights: list[float], label: int, replaced: int) -> None:
        self.tally = tally
        self.weights = weights
        self.label = label
        self.moved = _moved(weights, replaced)
        self._cache: dict[bytes, tuple[list[float], list[float]]] = {}
        self._ceiling: tuple[list[float], list[float]] | None = None

    def ceiling(self) -> tuple[list[float], list[float]]:
        """The worst case of a column above every contender's: per ballot, the largest
        value it gives a class other than the label (``_holds``'s shortcut)."""
        if self._ceiling is None:
            tally, n = self.tally, len(self.weights)
            top = [0.0] * n
            for c in tally.named:
                if c != self.label:
                    top = [x if x > y else y for x, y in zip(top, tally.columns[c], strict=True)]
            self._ceiling = _shift(top, self.weights, self.moved, 1.0)
        return self._ceiling

    def get(self, c: int) -> tuple[bytes, list[float], list[float]]:
        key = self.tally.keys[c] + (b"w" if c == self.label else b"c")
        if key not in self._cache:
            to = 0.0 if c == self.label else 1.0
            self._cache[key] = _shift(self.tally.columns[c], self.weights, self.moved, to)
        return key, *self._cache[key]


def _holds(
    tally: _Tally,
    rule: str,
    trim: int | None,
    label: int,
    *,
    replaced: int = 0,
    added: int = 0,
    added_weight: float = 1.0,
    shifts: _Shifts | None = None,
    shortcut: bool = True,
) -> bool:
    """Whether ``label`` surely survives ``replaced`` ballots replaced and ``added`` more.

    ``shifts`` is a ``_Shifts`` for the same ``label`` and ``replaced``, when the caller
    has one to share between checks. ``shortcut=False`` checks class by class only: the
    same answer at a higher cost (for the tests, and the benchmark's old behaviour).
    """
    num_classes = len(tally.columns)
    if rule == "vote":
        counts = _counts(tally.top1, num_classes)
        low = float(max(0, counts[label] - replaced))
        return all(
            _leads(label, c, low - float(counts[c] + replaced + added))
            for c in range(num_classes)
            if c != label
        )
    weights = _rule_weights(tally, rule)
    if shifts is None:
        shifts = _Shifts(tally, weights, label, replaced)
    extra = added * (added_weight if rule == "robust" else 1.0)
    cut = _cut(rule, trim, len(weights) + added, _sum(weights) + extra)
    memo: dict[bytes, float] = {}

    def worst(v: list[float], w: list[float]) -> float:
        # Added ballots sit at the same extreme as the moved mass (the last value).
        return _aggregate(v, [*w[:-1], w[-1] + extra], cut, rule)

    def bound(c: int) -> float:
        key, v, w = shifts.get(c)
        if key not in memo:
            memo[key] = worst(v, w)
        return memo[key]

    if num_classes == 1:
        return True
    low = bound(label)
    # Shortcut: a contender's score is monotone in its values, so a column at least every
    # contender's, ballot by ballot (``_Shifts.ceiling``), bounds them all at once. If the
    # label clearly beats that bound, by more than any tie rule or float error needs, it
    # beats each contender: no check class by class.
    if shortcut and low - worst(*shifts.ceiling()) > _CLEAR_LEAD:
        return True
    # Class by class, the listed contenders strongest first: when the label falls, it is
    # usually to the runner-up, and the other checks are spared.
    rivals = sorted(
        (c for c in tally.named if c != label), key=lambda c: (-_sum(tally.columns[c]), c)
    )
    rest = [c for c in range(num_classes) if c != label and c not in rivals]
    return all(_leads(label, c, low - bound(c)) for c in [*rivals, *rest])


# A lead this large passes ``_leads`` against any contender, lower index or not, with
# room for the float error between two scores of ballot-wise ordered columns (< 1e-12).
_CLEAR_LEAD: Final = 2 * TIE_EPS


def _leads(label: int, c: int, diff: float) -> bool:
    # A lower index wins ties: against one the winner needs a clear lead.
    return not ((c < label and diff <= 1.5 * TIE_EPS) or (c > label and diff < -0.5 * TIE_EPS))


def _certified_f(tally: _Tally, rule: str, trim: int | None, label: int) -> int:
    """The largest r whose replacement provably cannot change ``label``.

    ``_holds`` is monotone in r (bounds only loosen), so a binary search finds it.
    """
    # Every ballot replaced always defeats the label when there is a contender at all.
    lo, hi = 0, len(tally.used) - (1 if len(tally.columns) > 1 else 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if not _replaced_outweigh(tally, rule, mid) and _holds(
            tally, rule, trim, label, replaced=mid
        ):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _replaced_outweigh(tally: _Tally, rule: str, replaced: int) -> bool:
    """Whether ``replaced`` ballots outweigh the rest, so that ``_holds`` surely fails:
    the test of ``_outweighed`` with the moved mass (the ``replaced`` largest weights)
    against the mass left in place. Their worst case puts that mass at 0 for the label
    and at 1.0 for a contender; every rule cuts less than half of the total from each
    tail, so the contender's score exceeds the label's. Not for ``vote``, which counts."""
    if rule == "vote" or len(tally.columns) < 2:
        return False
    weights = _rule_weights(tally, rule)
    moved = _moved(weights, replaced)
    return _outweighs(moved, _sum(weights) - moved)
