"""Tests of the voting rules, their tie-breaking, the robustness certificate and early exit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.decision import voting
from swarm.decision.voting import (
    RULES,
    TIE_EPS,
    Ballot,
    can_change,
    decide,
    robust_trim,
    trimmed_trim,
)
from swarm.errors import ConfigError, NoDecisionError

PROPERTY = settings(max_examples=400, deadline=None)


def b(peer: str, *topk: tuple[int, float], weight: float = 1.0) -> Ballot:
    """A ballot of ``peer`` with the given (class, probability) pairs."""
    return Ballot(peer, "v", tuple(topk), weight)


def scores(*pairs: tuple[int, float], num_classes: int = 10) -> tuple[float, ...]:
    """A dense score vector with ``pairs`` set and every other class 0."""
    out = [0.0] * num_classes
    for cls, value in pairs:
        out[cls] = value
    return tuple(out)


# --- the rules on hand-made ballots ---------------------------------------------------


def test_sum_adds_top_k_probabilities() -> None:
    """sum: each class scores the sum of its probabilities; absent classes count 0."""
    ballots = [b("a", (1, 0.6), (2, 0.3)), b("b", (2, 0.5), (1, 0.4)), b("c", (3, 0.9))]
    decision = decide(ballots, "sum")
    assert decision.label == 1
    assert decision.scores == pytest.approx(scores((1, 1.0), (2, 0.8), (3, 0.9)))
    assert decision.margin == pytest.approx(0.1)
    assert decision.confidence == pytest.approx(1.0 / 2.7)
    assert decision.used == ("a", "b", "c")
    assert decision.excluded == ()
    assert decision.rule == "sum"


def test_vote_counts_top1_classes() -> None:
    """vote: plurality of top-1 classes, whatever the probabilities."""
    ballots = [b("a", (4, 0.51)), b("b", (4, 0.4), (1, 0.39)), b("c", (1, 0.99))]
    decision = decide(ballots, "vote")
    assert decision.label == 4
    assert decision.scores == scores((4, 2.0), (1, 1.0))
    assert decision.confidence == pytest.approx(2 / 3)


def test_vote_ignores_empty_ballots() -> None:
    """An empty top-k abstains under vote."""
    assert decide([b("a"), b("b", (7, 0.2))], "vote").scores == scores((7, 1.0))


def test_trimmed_drops_the_extremes_of_each_class() -> None:
    """trimmed: per class, trim lowest and highest values, then average the rest."""
    ballots = [b("a", (0, 0.9)), b("b", (0, 0.5)), b("c", (0, 0.4), (1, 0.6)), b("d", (1, 0.8))]
    decision = decide(ballots, "trimmed", trim=1)
    # class 0: [0, .4, .5, .9] -> mean(.4, .5); class 1: [0, 0, .6, .8] -> mean(0, .6)
    assert decision.scores == pytest.approx(scores((0, 0.45), (1, 0.3)))
    assert decision.label == 0


def test_trimmed_default_trim_is_bft_bound() -> None:
    """The default trim is the largest f with n >= 3f + 1."""
    assert [trimmed_trim(n) for n in range(1, 11)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_median_per_class_for_odd_and_even_counts() -> None:
    """median: the middle value per class, the mean of the two middle ones for even n."""
    odd = [b("a", (2, 0.9)), b("b", (2, 0.2)), b("c", (2, 0.5), (3, 0.4))]
    assert decide(odd, "median").scores == pytest.approx(scores((2, 0.5)))
    even = [*odd, b("d", (3, 0.7))]
    assert decide(even, "median").scores == pytest.approx(scores((2, 0.35), (3, 0.2)))


def test_robust_trim_is_one_below_the_largest_minority() -> None:
    """robust trims floor((n-1)/2) - 1 per side, so nothing for n <= 4."""
    assert [robust_trim(n) for n in range(1, 12)] == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_robust_is_the_weighted_mean_for_few_ballots() -> None:
    """With n <= 4, robust is the weighted mean of each class."""
    ballots = [b("a", (0, 0.8), weight=1.0), b("b", (1, 0.9), weight=0.5), b("c", (0, 0.6))]
    decision = decide(ballots, "robust")
    assert decision.scores == pytest.approx(scores((0, 1.4 / 2.5), (1, 0.45 / 2.5)))
    assert decision.label == 0


def test_robust_uses_weights_and_sum_ignores_them() -> None:
    """Weights move the robust decision; the baseline rules ignore their values."""
    ballots = [b("a", (0, 0.7), weight=0.2), b("b", (1, 0.6), weight=1.0)]
    assert decide(ballots, "robust").label == 1
    assert decide(ballots, "sum").label == 0


def test_robust_weighted_trim_splits_the_edge_ballot() -> None:
    """robust cuts weight mass t/n of the total per tail, splitting a ballot if needed."""
    ballots = [
        b(str(i), (0, v), weight=w)
        for i, (v, w) in enumerate([(0.1, 1.0), (0.2, 0.5), (0.5, 1.0), (0.6, 1.0), (0.9, 0.5)])
    ]
    # n = 5 -> t = 1: cut 1/5 of the total weight 4.0, i.e. 0.8, from each tail. Sorted,
    # the values span weight [0, 1] (.1), [1, 1.5] (.2), [1.5, 2.5] (.5), [2.5, 3.5] (.6)
    # and [3.5, 4] (.9); the window [0.8, 3.2] keeps 0.2, 0.5, 1.0, 0.7 and 0 of them.
    kept = 0.2 * 0.1 + 0.5 * 0.2 + 1.0 * 0.5 + 0.7 * 0.6
    assert decide(ballots, "robust").scores[0] == pytest.approx(kept / 2.4)


def test_zero_weight_ballots_are_excluded_by_every_rule() -> None:
    """A ballot of weight 0 is reported as excluded and never counted."""
    ballots = [b("a", (1, 0.9)), b("b", (2, 1.0), weight=0.0), b("c", (2, 1.0), weight=0.0)]
    for rule in RULES:
        decision = decide(ballots, rule)
        assert decision.label == 1
        assert decision.used == ("a",)
        assert decision.excluded == ("b", "c")


@pytest.mark.parametrize("rule", RULES)
def test_ties_go_to_the_lowest_class(rule: str) -> None:
    """An exact tie is won by the lower class index, whatever the ballot order."""
    ballots = [b("a", (6, 0.5), (2, 0.4)), b("b", (2, 0.5), (6, 0.4))]
    assert decide(ballots, rule).label == 2
    assert decide(ballots[::-1], rule).label == 2


def test_near_ties_within_tie_eps_go_to_the_lowest_class() -> None:
    """Scores closer than TIE_EPS are a tie, so float noise cannot pick the winner."""
    ballots = [b("a", (5, 0.5 + TIE_EPS / 4)), b("b", (3, 0.5))]
    assert decide(ballots, "sum").label == 3
    assert decide([b("a", (5, 0.5 + 4 * TIE_EPS)), b("b", (3, 0.5))], "sum").label == 5


def test_no_ballots_is_no_decision() -> None:
    """Without a countable ballot, decide raises NoDecisionError."""
    with pytest.raises(NoDecisionError):
        decide([])
    with pytest.raises(NoDecisionError):
        decide([b("a", (1, 1.0), weight=0.0)])


@pytest.mark.parametrize(
    ("rule", "trim", "match"),
    [
        ("plurality", None, "unknown voting rule"),
        ("sum", 1, "trim applies"),
        ("trimmed", -1, ">= 0"),
    ],
)
def test_bad_rule_configuration_is_config_error(rule: str, trim: int | None, match: str) -> None:
    """Unknown rules and misplaced or negative trims raise ConfigError."""
    with pytest.raises(ConfigError, match=match):
        decide([b("a", (1, 1.0))], rule, trim=trim)


def test_large_trim_is_clamped_to_keep_a_ballot() -> None:
    """A trim beyond (n-1)/2 is clamped: it becomes the median, never an error."""
    ballots = [b("a", (1, 0.9)), b("b", (1, 0.2)), b("c", (1, 0.5))]
    assert decide(ballots, "trimmed", trim=5).scores[1] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("ballots", "match"),
    [
        ([b("a", (10, 0.5))], "classes must be distinct"),
        ([b("a", (1, 0.5), (1, 0.2))], "classes must be distinct"),
        ([b("a", (1, 1.5))], "probabilities in"),
        ([b("a", (1, 0.5), weight=-1.0)], "weight"),
        ([b("a", (1, 0.5), weight=float("nan"))], "weight"),
        ([b("a", (1, 0.5)), b("a", (2, 0.5))], "two ballots"),
    ],
)
def test_invalid_ballots_are_refused(ballots: list[Ballot], match: str) -> None:
    """Out-of-range classes or probabilities, bad weights and duplicate peers are refused."""
    with pytest.raises(ValueError, match=match):
        decide(ballots)


# --- colluding liars ------------------------------------------------------------------


def _honest(n: int, confidence: float) -> list[Ballot]:
    return [b(f"h{i}", (3, confidence), (5, 0.2)) for i in range(n)]


def _liars(n: int) -> list[Ballot]:
    return [b(f"l{i}", (9, 1.0), (0, 0.0)) for i in range(n)]


@pytest.mark.parametrize(("liars", "confidence"), [(2, 0.35), (3, 0.6)])
def test_robust_holds_against_colluding_liars_where_sum_flips(
    liars: int, confidence: float
) -> None:
    """n=7: 2 or 3 liars claiming class 9 with 1.0 flip sum but not robust."""
    ballots = _honest(7 - liars, confidence) + _liars(liars)
    assert decide(ballots, "sum").label == 9
    assert decide(ballots, "robust").label == 3
    assert decide(_honest(7 - liars, confidence), "robust").label == 3


@PROPERTY
@given(
    n=st.integers(3, 11),
    data=st.data(),
)
def test_robust_guarantee_for_any_minority_of_liars(n: int, data: st.DataObject) -> None:
    """If honest ballots give their class >= p and the liars' <= q, p - q above 1/2 (odd n)
    or 1/3 (even n), any minority naming one class with 1.0 cannot flip robust."""
    f = data.draw(st.integers(0, (n - 1) // 2))
    gap = 0.5 if n % 2 else 1 / 3
    q = data.draw(st.floats(0.0, (1 - gap) / 2 - 0.01))
    p = data.draw(st.floats(q + gap + 0.005, 1.0 - q))
    honest = [
        b(f"h{i}", (3, data.draw(st.floats(p, 1.0 - q))), (9, data.draw(st.floats(0.0, q))))
        for i in range(n - f)
    ]
    assert decide(honest + _liars(f), "robust").label == 3


# --- certificate ----------------------------------------------------------------------


def test_certified_f_exact_for_plurality_vote() -> None:
    """5 votes against 2 survive one swapped vote (4-3) but not two (3-4)."""
    ballots = [b(f"w{i}", (2, 0.9)) for i in range(5)] + [b("x", (8, 0.9)), b("y", (8, 0.9))]
    assert decide(ballots, "vote").certified_f == 1


def test_certified_f_exact_for_unanimous_sum() -> None:
    """Three certain ballots survive one liar under sum (2 > 1), not two."""
    assert decide([b(str(i), (4, 1.0)) for i in range(3)], "sum").certified_f == 1


def test_certified_f_is_zero_when_one_liar_flips() -> None:
    """A slim lead that one replaced ballot can overturn certifies 0."""
    ballots = [b("a", (0, 0.6)), b("c", (1, 0.55))]
    for rule in RULES:
        assert decide(ballots, rule).certified_f == 0


def test_certified_f_reaches_the_largest_minority_when_unanimous() -> None:
    """Unanimous confident ballots certify floor((n-1)/2) under robust and median."""
    ballots = [b(str(i), (6, 0.95), (1, 0.03)) for i in range(9)]
    assert decide(ballots, "robust").certified_f == 4
    assert decide(ballots, "median").certified_f == 4


@st.composite
def ballots_strategy(draw: st.DrawFn, *, num_classes: int) -> list[Ballot]:
    """Random ballots: top-0..2 of distinct classes, probabilities summing to <= 1."""
    n = draw(st.integers(1, 7))
    out = []
    for i in range(n):
        out.append(
            _random_ballot(draw, f"p{i}", num_classes, draw(st.sampled_from([0.0, 0.3, 1.0])))
        )
    return out


def _random_ballot(
    draw: Callable[[st.SearchStrategy[Any]], Any], peer: str, num_classes: int, weight: float
) -> Ballot:
    k = draw(st.integers(0, 2))
    classes = draw(st.lists(st.integers(0, num_classes - 1), min_size=k, max_size=k, unique=True))
    raw = [draw(st.integers(0, 20)) for _ in classes]
    scale = max(20, sum(raw))
    return Ballot(
        peer, "v", tuple((c, r / scale) for c, r in zip(classes, raw, strict=True)), weight
    )


def _adversarial_sets(used: list[Ballot], label: int, r: int) -> list[list[int]]:
    """Index sets a clever adversary would replace: the label's strongest and the heaviest."""

    def value(ballot: Ballot) -> float:
        return dict(ballot.topk).get(label, 0.0)

    by_value = sorted(range(len(used)), key=lambda i: (-value(used[i]), -used[i].weight))
    by_weight = sorted(range(len(used)), key=lambda i: (-used[i].weight, -value(used[i])))
    by_vote = sorted(
        range(len(used)),
        key=lambda i: (
            used[i].topk[:1] != () and max(used[i].topk, key=lambda e: (e[1], -e[0]))[0] != label
        ),
    )
    return [by_value[:r], by_weight[:r], by_vote[:r]]


@PROPERTY
@given(data=st.data(), num_classes=st.integers(2, 4), rule=st.sampled_from(RULES))
def test_certified_f_is_sound(data: st.DataObject, num_classes: int, rule: str) -> None:
    """Replacing any certified_f used ballots, adversarially or at random, keeps the label."""
    ballots = data.draw(ballots_strategy(num_classes=num_classes))
    try:
        decision = decide(ballots, rule, num_classes=num_classes)
    except NoDecisionError:
        return
    used = [ballot for ballot in ballots if ballot.weight > 0]
    r = decision.certified_f
    assert 0 <= r < len(used)
    attacks = _adversarial_sets(used, decision.label, r)
    attacks.append(data.draw(st.permutations(range(len(used))))[:r])
    for chosen in attacks:
        contents: list[tuple[tuple[int, float], ...]] = [((c, 1.0),) for c in range(num_classes)]
        contents += [
            ((c, 1.0), (decision.label, 0.0)) for c in range(num_classes) if c != decision.label
        ]
        contents.append(())
        for content in contents:
            replaced = [
                Ballot(x.peer_id, "v", content, x.weight) if i in chosen else x
                for i, x in enumerate(used)
            ]
            assert decide(replaced, rule, num_classes=num_classes).label == decision.label
        replaced = [
            _random_ballot(data.draw, x.peer_id, num_classes, x.weight) if i in chosen else x
            for i, x in enumerate(used)
        ]
        assert decide(replaced, rule, num_classes=num_classes).label == decision.label


@PROPERTY
@given(data=st.data(), num_classes=st.integers(2, 4), rule=st.sampled_from(RULES))
def test_permuting_ballots_does_not_change_the_decision(
    data: st.DataObject, num_classes: int, rule: str
) -> None:
    """The order in which replies arrived never changes the label or the certificate."""
    ballots = data.draw(ballots_strategy(num_classes=num_classes))
    shuffled = data.draw(st.permutations(ballots))
    try:
        first = decide(ballots, rule, num_classes=num_classes)
    except NoDecisionError:
        return
    second = decide(shuffled, rule, num_classes=num_classes)
    assert (second.label, second.certified_f) == (first.label, first.certified_f)
    assert second.scores == pytest.approx(first.scores)


@st.composite
def _contested_ballots(draw: st.DrawFn, *, num_classes: int) -> list[Ballot]:
    """3 to 7 ballots, each naming two classes with any probabilities and weights: many
    contenders per class, the case the ceiling shortcut must not get wrong."""
    out = []
    for i in range(draw(st.integers(3, 7))):
        first, second = draw(
            st.lists(st.integers(0, num_classes - 1), min_size=2, max_size=2, unique=True)
        )
        p = draw(st.floats(0.0, 1.0))
        q = draw(st.floats(0.0, 1.0 - p))
        out.append(Ballot(f"p{i}", "v", ((first, p), (second, q)), draw(st.floats(0.05, 1.0))))
    return out


@PROPERTY
@given(
    data=st.data(),
    num_classes=st.integers(3, 4),
    rule=st.sampled_from([r for r in RULES if r != "vote"]),
    replaced=st.integers(0, 3),
    added=st.integers(0, 3),
    added_weight=st.sampled_from([0.3, 1.0, 1.7]),
    contested=st.booleans(),
)
def test_ceiling_shortcut_answers_as_the_check_class_by_class(
    data: st.DataObject,
    num_classes: int,
    rule: str,
    replaced: int,
    added: int,
    added_weight: float,
    contested: bool,
) -> None:
    """Bounding every contender at once by the ballot-wise ceiling of their columns never
    changes whether the label holds: the certificate and early exit rest on it."""
    strategy = _contested_ballots if contested else ballots_strategy
    ballots = data.draw(strategy(num_classes=num_classes))
    tally = voting._tally(ballots, num_classes)
    if not tally.used:
        return
    label = voting._winner(voting._scores(tally, rule, None))
    replaced = min(replaced, len(tally.used))
    kwargs: dict[str, Any] = {"replaced": replaced, "added": added, "added_weight": added_weight}
    fast = voting._holds(tally, rule, None, label, **kwargs)
    assert fast == voting._holds(tally, rule, None, label, **kwargs, shortcut=False)


def test_ceiling_shortcut_spares_the_contenders_on_a_clear_lead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five confident ballots for class 3: one replaced cannot overturn them, and that is
    known from the label's bound and the ceiling alone, no contender bounded on its own."""
    ballots = [
        b("a", (3, 0.91), (5, 0.05)),
        b("b", (3, 0.85), (2, 0.10)),
        b("c", (3, 0.97), (5, 0.02)),
        b("d", (3, 0.60), (7, 0.30)),
        b("e", (3, 0.99), (1, 0.01)),
    ]
    tally = voting._tally(ballots, 10)
    bounded: list[int] = []
    get = voting._Shifts.get

    def counting(self: voting._Shifts, c: int) -> tuple[bytes, list[float], list[float]]:
        bounded.append(c)
        return get(self, c)

    monkeypatch.setattr(voting._Shifts, "get", counting)
    assert voting._holds(tally, "robust", None, 3, replaced=1)
    assert bounded == [3]
    bounded.clear()
    assert voting._holds(tally, "robust", None, 3, replaced=1, shortcut=False)
    assert sorted(bounded) == list(range(10))
    bounded.clear()
    # Three of five replaced do overturn them: the runner-up (class 7, then 5) is
    # bounded first and the check stops there.
    assert not voting._holds(tally, "robust", None, 3, replaced=3)
    assert bounded[:2] == [3, 7]
    assert len(bounded) == 2


# --- early exit -----------------------------------------------------------------------


def test_can_change_with_nothing_missing_is_false() -> None:
    """Once every reply is in, nothing can change the decision."""
    assert not can_change([b("a", (1, 0.3))], 0)


def test_can_change_without_ballots_depends_on_missing() -> None:
    """With no ballot yet, any arriving ballot decides."""
    assert can_change([], 1)
    assert not can_change([], 0)


def test_can_change_allows_early_exit_on_a_clear_majority() -> None:
    """Five certain ballots cannot be overturned by one or two more, but can by many."""
    ballots = [b(str(i), (2, 1.0)) for i in range(5)]
    for rule in RULES:
        assert not can_change(ballots, 2, rule)
        assert can_change(ballots, 6, rule)


def test_can_change_respects_the_weight_of_missing_ballots() -> None:
    """robust: light ballots cannot overturn what heavy missing ones could."""
    ballots = [b("a", (2, 0.8), weight=0.2), b("b", (2, 0.8), weight=0.2)]
    assert can_change(ballots, 1, "robust", missing_weight=1.0)
    assert not can_change(ballots, 1, "robust", missing_weight=0.05)


@PROPERTY
@given(
    data=st.data(),
    num_classes=st.integers(2, 4),
    rule=st.sampled_from(RULES),
    missing=st.integers(0, 4),
)
def test_can_change_false_means_no_arrival_changes_the_label(
    data: st.DataObject, num_classes: int, rule: str, missing: int
) -> None:
    """If can_change is False, any 1..missing extra ballots keep the label."""
    ballots = data.draw(ballots_strategy(num_classes=num_classes))
    try:
        label = decide(ballots, rule, num_classes=num_classes).label
    except NoDecisionError:
        return
    if can_change(ballots, missing, rule, num_classes=num_classes):
        return
    weight = max([1.0, *(x.weight for x in ballots)])
    for j in range(1, missing + 1):
        for c in range(num_classes):
            extra = [b(f"new{i}", (c, 1.0), weight=weight) for i in range(j)]
            assert decide(ballots + extra, rule, num_classes=num_classes).label == label
        extra = [_random_ballot(data.draw, f"new{i}", num_classes, weight) for i in range(j)]
        assert decide(ballots + extra, rule, num_classes=num_classes).label == label


@PROPERTY
@given(
    data=st.data(),
    num_classes=st.integers(2, 4),
    rule=st.sampled_from(RULES),
    missing=st.integers(1, 6),
    missing_weight=st.floats(0.01, 2.0),
)
def test_outweighed_shortcut_agrees_with_the_full_check(
    data: st.DataObject, num_classes: int, rule: str, missing: int, missing_weight: float
) -> None:
    """Whenever the cheap test says the ballots to come outweigh those in, the full
    check also finds that they can change the label."""
    ballots = data.draw(ballots_strategy(num_classes=num_classes))
    tally = voting._tally(ballots, num_classes)
    if not tally.used or not voting._outweighed(tally, rule, missing, missing_weight):
        return
    assert voting._can_change(tally, rule, None, missing, missing_weight)


def test_outweighed_shortcut_is_taken_only_when_the_missing_outweigh() -> None:
    ballots = [b("a", (1, 0.9), weight=0.9), b("b", (1, 0.8), weight=0.9)]
    tally = voting._tally(ballots, 10)
    assert voting._outweighed(tally, "robust", 3, 0.9)  # 2.7 against 1.8
    assert not voting._outweighed(tally, "robust", 2, 0.9)  # 1.8 against 1.8
    assert not voting._outweighed(tally, "robust", 3, 0.5)
    assert voting._outweighed(tally, "median", 3, 0.5)  # unweighted: 3 against 2
    assert not voting._outweighed(tally, "vote", 9, 1.0)


@PROPERTY
@given(
    data=st.data(),
    num_classes=st.integers(2, 6),
    rule=st.sampled_from(RULES),
    replaced=st.integers(1, 7),
)
def test_replaced_outweigh_shortcut_agrees_with_the_full_check(
    data: st.DataObject, num_classes: int, rule: str, replaced: int
) -> None:
    """Whenever the cheap test says the replaced ballots outweigh the rest, the full
    check also finds that the label does not survive them."""
    ballots = data.draw(ballots_strategy(num_classes=num_classes))
    tally = voting._tally(ballots, num_classes)
    if not tally.used or replaced >= len(tally.used):
        return
    if not voting._replaced_outweigh(tally, rule, replaced):
        return
    label = voting._winner(voting._scores(tally, rule, None))
    assert not voting._holds(tally, rule, None, label, replaced=replaced)


def test_certified_f_skips_the_full_check_when_the_replaced_outweigh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three agreeing ballots of equal weight: replacing two outweighs the third, so the
    certificate's search runs the full check for one replaced ballot only."""
    ballots = [b(p, (4, 0.9), (1, 0.05)) for p in ("a", "b", "c")]
    tally = voting._tally(ballots, 10)
    assert voting._replaced_outweigh(tally, "robust", 2)
    assert not voting._replaced_outweigh(tally, "robust", 1)
    assert not voting._replaced_outweigh(tally, "vote", 2)
    checked: list[int] = []
    holds = voting._holds

    def counted(*args: Any, **kwargs: Any) -> bool:
        checked.append(kwargs.get("replaced", 0))
        return holds(*args, **kwargs)

    monkeypatch.setattr(voting, "_holds", counted)
    assert voting.decide(ballots).certified_f == 1
    assert checked == [1]


# --- clean-case accuracy --------------------------------------------------------------


def _synthetic_ensemble(rng: np.random.Generator, n: int) -> tuple[int, list[Ballot]]:
    """n variants of one noisy classifier: shared input difficulty plus own noise."""
    label = int(rng.integers(10))
    shared = rng.normal(0.0, 1.0, 10)
    ballots = []
    for i in range(n):
        logits = shared + rng.normal(0.0, 1.5, 10)
        logits[label] += 2.2
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:2]
        weight = float(rng.uniform(0.85, 0.92))
        ballots.append(b(f"p{i}", *((int(c), float(probs[c])) for c in top), weight=weight))
    return label, ballots


@pytest.mark.parametrize("n", [5, 7])
def test_robust_is_about_as_accurate_as_sum_without_liars(n: int) -> None:
    """Clean case: robust loses at most 1.5 points to sum, and beats the median and vote."""
    rng = np.random.default_rng(2023)
    correct = dict.fromkeys(RULES, 0)
    trials = 600
    for _ in range(trials):
        label, ballots = _synthetic_ensemble(rng, n)
        for rule in RULES:
            correct[rule] += decide(ballots, rule).label == label
    assert correct["robust"] >= correct["sum"] - 0.015 * trials
    assert correct["robust"] > correct["median"]
    assert correct["robust"] > correct["vote"]
