"""The ensemble arithmetic: top-k sums, leave-one-out, greedy selection."""

from __future__ import annotations

import numpy as np
import pytest

from variants import ensemble


def _probs(rows: list[list[float]]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def test_topk_mask_keeps_the_k_largest() -> None:
    """Top-k keeps each row's k largest probabilities and zeroes the rest."""
    p = _probs([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    np.testing.assert_allclose(ensemble.topk_mask(p, 1), [[0, 0.6, 0], [0.5, 0, 0]])
    np.testing.assert_allclose(ensemble.topk_mask(p, 2), [[0, 0.6, 0.3], [0.5, 0, 0.3]])
    with pytest.raises(ValueError, match="k=4"):
        ensemble.topk_mask(p, 4)


def test_top2_sum_can_overrule_every_top1() -> None:
    """Summing top-2 picks a class no member ranks first when all rank it second."""
    a = _probs([[0.50, 0.00, 0.45, 0.05]])
    b = _probs([[0.00, 0.50, 0.45, 0.05]])
    assert ensemble.ensemble_predict([a, b], k=2).tolist() == [2]
    # With k=1 only the first choices count; the tie goes to the lower class.
    assert ensemble.ensemble_predict([a, b], k=1).tolist() == [0]


def test_leave_one_out_on_known_members() -> None:
    """Leave-one-out accuracies equal the ones computed by hand for three members."""
    labels = np.array([0, 1])
    good = _probs([[0.9, 0.1], [0.1, 0.9]])
    bad = _probs([[0.2, 0.8], [0.8, 0.2]])
    half = _probs([[0.6, 0.4], [0.6, 0.4]])
    loo = ensemble.leave_one_out({"good": good, "bad": bad, "half": half}, labels, k=2)
    # Without "good", bad + half get both wrong; without either other one, both are right.
    assert loo == {"good": 0.0, "bad": 1.0, "half": 1.0}
    with pytest.raises(ValueError, match="two members"):
        ensemble.leave_one_out({"good": good}, labels)


def test_greedy_forward_stops_when_accuracy_stops_rising() -> None:
    """Greedy selection adds the best member first and stops once none helps past the minimum."""
    labels = np.array([0, 0, 1, 1])
    best = _probs([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.6, 0.4]])
    same = best.copy()
    worse = _probs([[0.05, 0.95], [0.05, 0.95], [0.95, 0.05], [0.95, 0.05]])
    steps = ensemble.greedy_forward(
        {"best": best, "same": same, "worse": worse},
        labels,
        min_members=1,
        cost={"best": 1.0, "same": 2.0},
    )
    assert steps == [("best", 0.75)]
    forced = ensemble.greedy_forward(
        {"best": best, "same": same, "worse": worse},
        labels,
        min_members=2,
        cost={"best": 1.0, "same": 2.0},
    )
    assert [n for n, _ in forced] == ["best", "same"]


def _selection_case() -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray], np.ndarray]:
    """Five candidates on 40 labels: 'slow' and 'fast' both qualify as the cheapest by
    MACs; 'slow' is the more accurate."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 40)
    accuracy = {"slow": 0.95, "fast": 0.85, "a": 0.9, "b": 0.9, "c": 0.9, "reference": 0.97}
    probs = {}
    for name, acc in accuracy.items():
        p = rng.dirichlet(np.ones(10), 40) * 0.1
        right = rng.random(40) < acc
        p[np.arange(40), np.where(right, labels, (labels + 1) % 10)] += 1.0
        probs[name] = p / p.sum(1, keepdims=True)
    finals = {n: {"val_accuracy": float((probs[n].argmax(1) == labels).mean())} for n in probs}
    return finals, probs, labels


def test_selection_anchor_must_be_fast_enough() -> None:
    """The cheapest member is the most accurate >=20x candidate that also clears the
    measured speedup with its margin; without measurements MACs alone decide."""
    from variants.export import MIN_CHEAPEST_SPEEDUP, SPEEDUP_MARGIN, ExportError, select

    finals, probs, labels = _selection_case()
    macs = {"reference": 1000, "slow": 40, "fast": 30, "a": 150, "b": 150, "c": 150}
    by_macs = select(finals, probs, labels, macs, 5, 5)
    assert by_macs["anchor"] == "slow"
    need = MIN_CHEAPEST_SPEEDUP * SPEEDUP_MARGIN
    timed = select(finals, probs, labels, macs, 5, 5, {"slow": need - 0.1, "fast": need + 3})
    assert timed["anchor"] == "fast"
    assert timed["candidates"]["slow"]["speedup"] == round(need - 0.1, 2)
    assert "faster" in timed["rule"]
    with pytest.raises(ExportError, match="faster"):
        select(finals, probs, labels, macs, 5, 5, {"slow": 5.0, "fast": 9.0})
