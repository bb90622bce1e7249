"""What a classify call asks for (``Policy``) and what it gives back (``ClassifyResult``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Final, Literal

from swarm.errors import ConfigError
from swarm.requester.fanout import Rejection, ReplyInfo

AUTO_WAVE: Final = "auto"


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """Which variants a classify call asks."""

    variants: tuple[str, ...] | None = None  # None: every variant of the manifest
    max_macs: int | None = None  # total MACs (manifest values) of the variants asked
    latency_budget_ms: float | None = None  # skip replicas estimated slower than this
    # Ballots per variant: 1 asks the best replica of each variant (the paper's set-up);
    # None asks every eligible replica, so each peer votes and the vote tolerates up to
    # half of the *peers* lying rather than half of the variants.
    replicas: int | None = 1
    # Ballots asked at once (``swarm.requester.fanout``, "Waves"): None asks every one at once; n
    # asks n, the cheapest per unit of trust, and the rest only if those leave the label
    # open (the same label either way). "auto"
    # (the default) asks every one at once while the requester has fewer than
    # ``config.WAVE_IN_FLIGHT`` calls in flight, and a majority first from there on.
    wave: int | Literal["auto"] | None = AUTO_WAVE
    # Stop as soon as the replies still out cannot change the label (``swarm.requester.fanout``,
    # "Early exit"); False waits for every ballot asked, up to the deadline.
    early_exit: bool = True

    def __post_init__(self) -> None:
        if self.variants is not None and (
            not isinstance(self.variants, tuple) or not self.variants
        ):
            raise ConfigError("Policy.variants must be a non-empty tuple of names, or None")
        if self.max_macs is not None and self.max_macs < 0:
            raise ConfigError(f"Policy.max_macs must be >= 0, got {self.max_macs}")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise ConfigError(f"Policy.latency_budget_ms must be > 0: {self.latency_budget_ms}")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"Policy.replicas must be >= 1 or None (all), got {self.replicas}")
        if self.wave not in (None, AUTO_WAVE) and (type(self.wave) is not int or self.wave < 1):
            raise ConfigError(
                f"Policy.wave must be 'auto', an integer >= 1 or None (all), got {self.wave!r}"
            )


DEFAULT_POLICY: Final = Policy()


@dataclasses.dataclass(frozen=True, slots=True)
class ClassifyResult:
    """A decision and the evidence behind it (``swarm.requester.fanout`` defines the peer lists)."""

    label: int
    class_name: str
    confidence: float
    certified_f: int
    rule: str
    latency_ms: float
    replies: tuple[ReplyInfo, ...]
    rejected: tuple[Rejection, ...]
    missing: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    request_id: str = ""
    wave: int | None = None  # the ballots asked first, when the call went in waves

    def to_json(self, image: str | None = None) -> dict[str, Any]:
        """The decision as the CLI prints it and ``POST /v1/classify`` returns it."""
        return {
            "image": image,
            "class": self.label,
            "label": self.class_name,
            "confidence": round(self.confidence, 6),
            "certified_f": self.certified_f,
            "latency_ms": round(self.latency_ms, 3),
            "rule": self.rule,
            "replies": [
                {
                    "peer": r.peer,
                    "variant": r.variant,
                    "topk": [[cls, prob] for cls, prob in r.topk],
                    "latency_ms": round(r.latency_ms, 3),
                }
                for r in self.replies
            ],
            "rejected": [{"peer": r.peer, "reason": r.reason} for r in self.rejected],
            "missing": list(self.missing),
            "skipped": list(self.skipped),
            "wave": self.wave,
        }
