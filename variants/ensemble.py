"""Ensemble arithmetic on probability matrices (numpy only).

The paper's aggregation: each variant contributes its top-k class probabilities
(k=2 by default); the ensemble's label is the class with the largest sum.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np


def topk_mask(probs: np.ndarray, k: int) -> np.ndarray:
    """Keep each row's k largest probabilities, zero the rest. probs: (N, C)."""
    if not 1 <= k <= probs.shape[1]:
        raise ValueError(f"k={k} outside 1..{probs.shape[1]}")
    # Stable ordering: among equal probabilities the lower class index wins, as in argmax.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(probs)
    rows = np.arange(probs.shape[0])[:, None]
    out[rows, order] = probs[rows, order]
    return out


def ensemble_predict(member_probs: Sequence[np.ndarray], k: int = 2) -> np.ndarray:
    """Labels from summing each member's top-k probabilities. Each array is (N, C)."""
    if not member_probs:
        raise ValueError("an ensemble needs at least one member")
    total = np.zeros_like(member_probs[0], dtype=np.float64)
    for p in member_probs:
        total += topk_mask(p, k)
    return np.argmax(total, axis=1)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(pred == labels))


def ensemble_accuracy(member_probs: Sequence[np.ndarray], labels: np.ndarray, k: int = 2) -> float:
    return accuracy(ensemble_predict(member_probs, k), labels)


def leave_one_out(probs: dict[str, np.ndarray], labels: np.ndarray, k: int = 2) -> dict[str, float]:
    """Accuracy of the ensemble of all members but one, for each member left out."""
    names = list(probs)
    if len(names) < 2:
        raise ValueError("leave-one-out needs at least two members")
    return {
        out: ensemble_accuracy([probs[n] for n in names if n != out], labels, k) for out in names
    }


def subsets(names: Sequence[str], min_size: int = 1) -> Iterable[tuple[str, ...]]:
    for size in range(min_size, len(names) + 1):
        yield from itertools.combinations(names, size)


def greedy_forward(
    probs: dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    start: Sequence[str] = (),
    min_members: int = 1,
    max_members: int | None = None,
    k: int = 2,
    cost: dict[str, float] | None = None,
) -> list[tuple[str, float]]:
    """Greedy forward selection of ensemble members by accuracy on (validation) labels.

    Adds, one at a time, the member that raises the ensemble's accuracy most (ties go to
    the cheaper one), beyond ``min_members`` only while accuracy still rises. Returns the
    sequence of (member, ensemble accuracy after adding it).
    """
    chosen = list(start)
    steps = [
        (n, ensemble_accuracy([probs[m] for m in chosen[: i + 1]], labels, k))
        for i, n in enumerate(chosen)
    ]
    best = steps[-1][1] if steps else 0.0
    limit = max_members or len(probs)
    cost = cost or {}
    while len(chosen) < limit:
        options = []
        for name in probs:
            if name in chosen:
                continue
            acc = ensemble_accuracy([probs[m] for m in [*chosen, name]], labels, k)
            options.append((-acc, cost.get(name, 0.0), name, acc))
        if not options:
            break
        _, _, name, acc = min(options)
        if len(chosen) >= min_members and acc <= best:
            break
        chosen.append(name)
        steps.append((name, acc))
        best = max(best, acc)
    return steps
