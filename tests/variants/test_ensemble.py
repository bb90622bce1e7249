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
    """A cheap candidate that does not clear the measured speedup with its margin is
    neither the anchor nor a member; without a fast one, selection stops with why."""
    from variants.export import MIN_CHEAPEST_SPEEDUP, SPEEDUP_MARGIN, ExportError, select

    finals, probs, labels = _selection_case()
    macs = {"reference": 1000, "slow": 40, "fast": 30, "a": 150, "b": 150, "c": 150}
    need = MIN_CHEAPEST_SPEEDUP * SPEEDUP_MARGIN
    timed = select(finals, probs, labels, macs, 5, 5, {"slow": need - 0.1, "fast": need + 3})
    assert timed["anchor"] == "fast"
    assert "slow" not in timed["members"]
    assert timed["candidates"]["slow"]["speedup"] == round(need - 0.1, 2)
    assert "faster" in timed["rule"]
    with pytest.raises(ExportError, match="faster"):
        select(finals, probs, labels, macs, 5, 5, {"slow": 5.0, "fast": 9.0})


def test_selection_anchor_is_the_one_with_the_best_family() -> None:
    """Of the fast cheap candidates, the anchor is the one whose greedy family scores
    best on validation, not merely the most accurate alone."""
    from variants.export import select

    labels = np.zeros(10, dtype=np.int64)

    def votes(right: set[int], p_right: float, p_wrong: float) -> np.ndarray:
        # Label 0 on the images in ``right``, class 1 on the others, the rest on the other.
        out = np.zeros((10, 10))
        for i in range(10):
            p = p_right if i in right else 1 - p_wrong
            out[i, 0], out[i, 1] = p, 1 - p
        return out

    probs = {
        "reference": votes(set(range(10)), 0.9, 0.9),
        "a": votes(set(range(7)), 0.6, 0.6),  # wrong on 7-9
        "solo": votes(set(range(8)), 0.9, 0.9),  # 80% alone, wrong on 8-9 like "a"
        "mend": votes({7, 8, 9}, 0.85, 0.55),  # 30% alone, right where "a" is wrong
    }
    finals = {n: {"val_accuracy": float((p.argmax(1) == labels).mean())} for n, p in probs.items()}
    macs = {"reference": 1000, "solo": 30, "mend": 30, "a": 150}
    picked = select(finals, probs, labels, macs, 2, 2)
    assert finals["solo"]["val_accuracy"] > finals["mend"]["val_accuracy"]
    assert picked["anchor_families"] == {"mend": 1.0, "solo": 0.8}
    assert picked["anchor"] == "mend"
    assert picked["members"] == ["mend", "a"]
