"""Scenarios: which peers run where, on what device, and which faults hit them when.

Built-in scenarios (``BUILTIN``) and TOML files share one schema::

    name = "my-crash"          # free text
    kind = "crash"             # the runner: paper, byzantine, crash, straggler,
                               # partition or churn
    images = 300               # held-out test images driven (the first N of t10k)
    deadline_ms = 2000         # each classify call's deadline
    seed = 0

    [profiles.slowboard]       # device profiles: CPU affinity, threads, slowdown
    cpus = [0]
    threads = 1
    slowdown = 3.0             # sleeps (3 - 1) x its inference time after each one

    [[peers]]                  # one table per peer, named p0, p1, ... in order
    variant = "V1"             # a manifest variant, or "auto" (chosen by its profile)
    profile = "slowboard"
    agent = false              # true: a sim agent (needed for slowdown and attacks)

    [[faults]]                 # crash/churn/partition schedules, seconds from the start
    at_s = 2.0
    action = "kill"            # kill, restart, pause, resume, stop, partition, heal
    peer = "p1"                # or groups = [["p0", "p1"], ["p2"]] for a partition

    [params]                   # runner-specific knobs (see each runner's docstring)
    f = [0, 1, 2, 3]
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Final

from swarm.inference.manifest import load_manifest

# One peer of each shipped variant (V1, the cheapest, first) is what the paper, crash and
# churn scenarios run.
VARIANTS: Final = tuple(spec.name for spec in load_manifest().variants)
KINDS: Final = ("paper", "byzantine", "crash", "straggler", "partition", "churn")
ACTIONS: Final = ("kill", "restart", "pause", "resume", "stop", "partition", "heal")


class ScenarioError(ValueError):
    """A scenario file or option is wrong; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """A device: which CPUs, how many inference threads, how much slower than this one."""

    cpus: tuple[int, ...] = ()
    threads: int = 1
    slowdown: float = 1.0


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    name: str
    variant: str
    profile: Profile = Profile()
    agent: bool = False


@dataclasses.dataclass(frozen=True)
class Fault:
    at_s: float
    action: str
    peer: str = ""
    groups: tuple[tuple[str, ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    peers: tuple[PeerSpec, ...]
    images: int = 200
    deadline_ms: int = 2000
    seed: int = 0
    faults: tuple[Fault, ...] = ()
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def with_options(
        self,
        *,
        peers: int | None = None,
        images: int | None = None,
        seed: int | None = None,
        deadline_ms: int | None = None,
    ) -> Scenario:
        """This scenario with the command line's overrides."""
        out = self
        if peers is not None and peers != len(self.peers):
            agents = {i for i, p in enumerate(self.peers) if p.agent}
            out = dataclasses.replace(
                out,
                peers=tuple(
                    PeerSpec(f"p{i}", VARIANTS[i % len(VARIANTS)], agent=i in agents)
                    for i in range(peers)
                ),
            )
        if images is not None:
            out = dataclasses.replace(out, images=images)
        if seed is not None:
            out = dataclasses.replace(out, seed=seed)
        if deadline_ms is not None:
            out = dataclasses.replace(out, deadline_ms=deadline_ms)
        return out


def _peers(variants: tuple[str, ...], agents: int = 0) -> tuple[PeerSpec, ...]:
    return tuple(PeerSpec(f"p{i}", v, agent=i < agents) for i, v in enumerate(variants))


BUILTIN: Final[dict[str, Scenario]] = {
    "paper": Scenario("paper", "paper", _peers(VARIANTS), images=500),
    # n = 7: every variant, and replicas of V3 and V5. The liars come first (p0, p1, p2:
    # V1, V2, V4 hold no replica, so a requester that asks one peer per variant cannot
    # route around them and must outvote or exclude them).
    "byzantine": Scenario(
        "byzantine",
        "byzantine",
        _peers(("V1", "V2", "V4", "V3", "V5", "V3", "V5"), agents=3),
        images=300,
        params={"f": [0, 1, 2, 3], "live_images": 150},
    ),
    "crash": Scenario(
        "crash",
        "crash",
        _peers(VARIANTS),
        images=600,
        faults=(
            Fault(2.0, "kill", "p1"),
            Fault(2.5, "kill", "p2"),
            Fault(3.0, "kill", "p3"),
            Fault(3.5, "kill", "p4"),
            Fault(6.0, "restart", "p1"),
            Fault(6.5, "restart", "p2"),
            Fault(7.0, "restart", "p3"),
            Fault(7.5, "restart", "p4"),
        ),
        params={"interval_ms": 20},
    ),
    "straggler": Scenario(
        "straggler",
        "straggler",
        _peers(("V1", "V2", "V3", "V4", "V5", "V3"), agents=1),
        images=200,
        deadline_ms=1000,
        params={"delay_ms": 400, "no_early_exit_images": 20},
    ),
    "partition": Scenario(
        "partition",
        "partition",
        _peers(("V1", "V2", "V3", "V4", "V5", "V1")),
        images=100,
        params={"groups": [["p0", "p1", "p2"], ["p3", "p4", "p5"]]},
    ),
    "churn": Scenario(
        "churn", "churn", _peers(VARIANTS), images=600, params={"interval_ms": 20, "period_s": 1.5}
    ),
}


def builtin(name: str) -> Scenario:
    try:
        return BUILTIN[name]
    except KeyError:
        raise ScenarioError(
            f"unknown scenario {name!r}: use one of {', '.join(BUILTIN)} or a .toml file"
        ) from None


def load(path: Path) -> Scenario:
    """A scenario from a TOML file (schema in this module's docstring)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from exc
    try:
        return _parse(raw, path.stem)
    except (KeyError, TypeError, ValueError) as exc:
        raise ScenarioError(f"{path}: {exc}") from exc


def _parse(raw: dict[str, Any], default_name: str) -> Scenario:
    kind = str(raw["kind"])
    if kind not in KINDS:
        raise ScenarioError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    profiles = {
        name: Profile(
            cpus=tuple(int(c) for c in p.get("cpus", ())),
            threads=int(p.get("threads", 1)),
            slowdown=float(p.get("slowdown", 1.0)),
        )
        for name, p in raw.get("profiles", {}).items()
    }
    peers = []
    for i, p in enumerate(raw.get("peers", [])):
        variant = str(p["variant"])
        if variant != "auto" and variant not in VARIANTS:
            raise ScenarioError(f"peer {i}: variant must be one of {VARIANTS} or auto")
        profile = profiles[p["profile"]] if "profile" in p else Profile()
        if profile.slowdown < 1.0:
            raise ScenarioError(f"peer {i}: slowdown must be >= 1")
        agent = bool(p.get("agent", False)) or profile.slowdown > 1.0
        peers.append(PeerSpec(f"p{i}", variant, profile, agent))
    if not peers:
        raise ScenarioError("a scenario needs at least one [[peers]] table")
    names = {p.name for p in peers}
    faults = []
    for f in raw.get("faults", []):
        action = str(f["action"])
        if action not in ACTIONS:
            raise ScenarioError(f"fault action must be one of {', '.join(ACTIONS)}")
        fault = Fault(
            float(f["at_s"]),
            action,
            str(f.get("peer", "")),
            tuple(tuple(str(n) for n in g) for g in f.get("groups", ())),
        )
        if action not in ("partition", "heal") and fault.peer not in names:
            raise ScenarioError(f"fault at {fault.at_s} s names unknown peer {fault.peer!r}")
        faults.append(fault)
    return Scenario(
        name=str(raw.get("name", default_name)),
        kind=kind,
        peers=tuple(peers),
        images=int(raw.get("images", 200)),
        deadline_ms=int(raw.get("deadline_ms", 2000)),
        seed=int(raw.get("seed", 0)),
        faults=tuple(sorted(faults, key=lambda f: f.at_s)),
        params=dict(raw.get("params", {})),
    )


__all__ = [
    "BUILTIN",
    "Fault",
    "PeerSpec",
    "Profile",
    "Scenario",
    "ScenarioError",
    "builtin",
    "load",
]
