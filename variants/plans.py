"""Recipes and plans: the reference and the candidate pool a family is selected from.

Fashion-MNIST keeps its hand-made pool (``default_plan``, the shipped family's). Any other
dataset gets a pool derived from it (``auto_plan``): the reference at the dataset's input
size, and candidates at three widths, three input resolutions (the full input and about
3/4 and 3/5 of it), full and half depth, with and without distillation from the
reference; the epochs and batch size follow the dataset's size. ``joint_group`` is the
set of members the joint recipe trains together.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

RES_FRACTIONS = (1.0, 0.75, 0.6)
MIN_RESOLUTION = 5
JOINT_PREFIX = "joint-"


@dataclass(frozen=True)
class Recipe:
    """Everything that defines how one model is trained."""

    name: str
    width: float
    resolution: int
    depth: float = 1.0
    epochs: int = 40
    lr: float = 0.2
    weight_decay: float = 5e-5
    batch: int = 256
    seed: int = 0
    label_smoothing: float = 0.0
    erase_p: float = 0.5
    distill: bool = False
    kd_alpha: float = 0.7
    kd_temperature: float = 3.0
    train_limit: int = 0  # >0: train on that many images only (smoke runs)
    joint: str = ""  # the joint group this member trains in ("": trained alone)
    joint_beta: float = 0.5  # weight of the ensemble's loss in the joint recipe

    @property
    def role(self) -> str:
        return "reference" if self.name == "reference" else "variant"


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """A recipe from a checkpoint; fields it predates take their defaults."""
    known = Recipe.__dataclass_fields__
    return Recipe(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class Rules:
    """What selection requires of the members against the reference."""

    min_macs_gain: float  # every variant: at least this many times fewer MACs
    min_cheapest_gain: float  # the cheapest member: at least this many times fewer
    min_cheapest_speedup: float | None  # ... and this much faster when timed (None: off)


# The shipped family's rules; the paper reports 4.3-31x fewer MACs per variant.
FASHION_RULES = Rules(min_macs_gain=5.0, min_cheapest_gain=20.0, min_cheapest_speedup=10.0)
# Derived families: at small inputs the stem and the 1280-channel head bound the gain.
AUTO_RULES = Rules(min_macs_gain=4.0, min_cheapest_gain=10.0, min_cheapest_speedup=None)


def candidate(
    width: float, res: int, seed: int, distill: bool, depth: float = 1.0, **kw: Any
) -> Recipe:
    shape = f"w{round(width * 100):03d}-r{res}" + (
        "" if depth == 1.0 else f"-d{round(depth * 100)}"
    )
    name = f"{shape}-s{seed}" + ("-kd" if distill else "")
    return Recipe(
        name=name, width=width, resolution=res, depth=depth, seed=seed, distill=distill, **kw
    )


def default_plan() -> list[Recipe]:
    """Fashion-MNIST: the reference and a pool of candidate variants.

    Width 0.25 at several input resolutions follows the paper's seed table; a few wider,
    lower-resolution candidates and plain (undistilled) twins let selection measure what
    distillation and width buy.
    """
    plan = [
        Recipe(
            "reference",
            width=1.0,
            resolution=28,
            epochs=40,
            lr=0.2,
            weight_decay=1e-4,
            label_smoothing=0.1,
            seed=0,
        )
    ]
    plan += [
        candidate(w, r, s, False)
        for w, r, s in [(0.25, 28, 11), (0.25, 20, 12), (0.25, 14, 13), (0.5, 16, 14)]
    ]
    plan += [
        candidate(w, r, s, True)
        for w, r, s in [
            (0.25, 28, 1),
            (0.25, 24, 2),
            (0.25, 20, 3),
            (0.25, 16, 4),
            (0.25, 14, 5),
            (0.25, 12, 6),
            (0.35, 24, 7),
            (0.35, 18, 8),
            (0.5, 16, 9),
            (0.5, 14, 10),
        ]
    ]
    # Half-depth twins of the cheapest: at 14-16 px, per-layer overhead, not MACs, sets
    # the latency, so fewer layers buy the 10x latency target that width alone misses.
    plan += [candidate(0.25, r, s, True, depth=0.5) for r, s in [(14, 15), (16, 16)]]
    # ... and plain twins of those: on validation, a plain cheapest member complemented
    # the rest of the family slightly better than a distilled one.
    plan += [candidate(0.25, r, s, False, depth=0.5) for r, s in [(14, 17), (16, 18)]]
    return plan


def smoke_plan() -> list[Recipe]:
    """A minutes-long plan that runs every phase end to end (for tests and CI)."""
    tiny: dict[str, Any] = {"epochs": 1, "batch": 64, "train_limit": 256, "lr": 0.05}
    return [
        Recipe("reference", width=1.0, resolution=28, seed=0, **tiny),
        candidate(0.25, 14, 1, False, **tiny),
        candidate(0.25, 12, 2, True, **tiny),
    ]


def resolutions(size: int) -> list[int]:
    """The candidates' input resolutions for a family whose input is ``size`` pixels."""
    out = sorted({max(MIN_RESOLUTION, round(size * f)) for f in RES_FRACTIONS}, reverse=True)
    return [r for r in out if r <= size]


def schedule(train_images: int) -> dict[str, Any]:
    """Batch, epochs and learning rate for a training set of this size.

    Small sets take small batches and more epochs (about 2,000 steps in all, 30 to 60
    epochs); the learning rate scales with the batch (0.2 at 256).
    """
    batch = 256 if train_images >= 20_000 else 128 if train_images >= 4_000 else 64
    steps = max(1, train_images // batch)
    epochs = min(60, max(30, math.ceil(2_000 / steps)))
    if train_images >= 200_000:
        epochs = 20
    return {"batch": batch, "epochs": epochs, "lr": round(0.2 * batch / 256, 4)}


def auto_plan(size: int, train_images: int, hflip: bool = True) -> list[Recipe]:
    """The reference and a candidate pool derived from the input size and the data size."""
    sched = schedule(train_images)
    full, *lower = resolutions(size)
    mid = lower[0] if lower else full
    low = lower[-1] if lower else full
    plan = [
        Recipe(
            "reference",
            width=1.0,
            resolution=full,
            weight_decay=1e-4,
            label_smoothing=0.1,
            seed=0,
            **sched,
        )
    ]
    shapes: list[tuple[float, int, bool, float]] = [
        (0.25, full, True, 1.0),
        (0.25, mid, True, 1.0),
        (0.25, low, True, 1.0),
        (0.35, full, True, 1.0),
        (0.35, mid, True, 1.0),
        (0.5, mid, True, 1.0),
        (0.5, low, True, 1.0),
        (0.25, full, False, 1.0),
        (0.25, low, False, 1.0),
        (0.5, low, False, 1.0),
        (0.25, mid, True, 0.5),
        (0.25, low, True, 0.5),
        (0.25, low, False, 0.5),
    ]
    seen: set[str] = set()
    for seed, (w, r, kd, d) in enumerate(shapes, start=1):
        rec = candidate(w, r, seed, kd, depth=d, **sched)
        key = rec.name.split("-s")[0] + ("-kd" if kd else "")
        if key not in seen:  # small inputs collapse resolutions: keep one of each shape
            seen.add(key)
            plan.append(rec)
    return plan


def joint_group(plan: list[Recipe], size: int, members: int = 7) -> list[Recipe]:
    """The members the joint recipe trains together: diverse shapes across the cost range."""
    ref = next(r for r in plan if r.name == "reference")
    full, *lower = resolutions(size)
    mid = lower[0] if lower else full
    low = lower[-1] if lower else full
    shapes = [
        (0.25, full, 1.0),
        (0.25, mid, 1.0),
        (0.25, low, 0.5),
        (0.35, full, 1.0),
        (0.35, mid, 1.0),
        (0.5, mid, 1.0),
        (0.5, low, 1.0),
    ][:members]
    kw = {"epochs": ref.epochs, "batch": ref.batch, "lr": ref.lr, "train_limit": ref.train_limit}
    group = []
    for i, (w, r, d) in enumerate(shapes):
        rec = candidate(w, r, 100 + i, True, depth=d, joint="joint", **kw)
        group.append(dataclasses.replace(rec, name=JOINT_PREFIX + rec.name))
    return group


def tiny_plan(size: int) -> list[Recipe]:
    """A seconds-long derived plan (one epoch, a few images) for tests and smoke runs."""
    tiny: dict[str, Any] = {"epochs": 1, "batch": 16, "lr": 0.05, "train_limit": 64}
    full, *lower = resolutions(size)
    low = lower[-1] if lower else full
    return [
        Recipe("reference", width=1.0, resolution=full, seed=0, **tiny),
        candidate(0.25, full, 1, True, **tiny),
        candidate(0.25, low, 2, False, **tiny),
        candidate(0.25, low, 3, True, depth=0.5, **tiny),
    ]
