"""``byzantine``: f of n peers lie; how every voting rule and the live requester fare.

Method (stated in the report too). For each attack and each f, the first f agents switch
to that attack and the others stay honest. Then, per image, the driver *gathers*: it
sends one signed request to every peer, verifies each reply with ``wire.verify_reply``
exactly as the requester does, and applies all five rules to that same set of verified
ballots (weights: the variant's validation accuracy; no reputation). The rules are thus
compared on identical replies. Separately, ``robust`` runs *live*: ``Requester.classify``
asking every peer (``Policy(replicas=None)``: with one replica per variant, 7 peers give
only 5 ballots and 3 liars could hold a majority of them), with hedging, early exit and
reputation (fresh for every pass), on the first ``live_images`` images.

Params: ``f`` (list of liar counts), ``attacks`` (default all of ``sim.byzantine.ATTACKS``),
``live_images``, ``target`` (the targeted flip's class).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import structlog

from sim import control
from sim.byzantine import ATTACKS, DEFAULT_TARGET, EXPECTED_REJECTION, HONEST, REJECT_ATTACKS
from sim.procs import Cluster, Driver, Proc
from sim.runners.common import Report, percentile, start_swarm, summarize, target
from sim.scenario import VARIANTS, Scenario
from swarm.decision import voting

log = structlog.get_logger("sim.byzantine")


def _claim_runs(variant: str) -> str:
    return next(v for v in VARIANTS if v != variant)


async def _set_liars(liars: list[Proc], agents: list[Proc], attack: str, tgt: int) -> None:
    for proc in agents:
        assert proc.control is not None
        mode = attack if proc in liars else HONEST
        await control.set_mode(proc.control, attack=mode, target=tgt)


def _rows(
    events: list[dict[str, Any]],
    f: int,
    attack: str,
    liar_ids: set[str],
) -> list[dict[str, Any]]:
    latencies = [float(e["latency_ms"]) for e in events]
    liar_replies = sum(1 for e in events for p in e["ballots"] if p in liar_ids) + sum(
        1 for e in events for p, _ in e["rejected"] if p in liar_ids
    )
    liar_rejected = Counter(r for e in events for p, r in e["rejected"] if p in liar_ids)
    liar_counted = sum(1 for e in events for p in e["ballots"] if p in liar_ids)
    honest_rejected = sum(1 for e in events for p, _ in e["rejected"] if p not in liar_ids)
    rows = []
    for rule in voting.RULES:
        answered = [e for e in events if e["preds"][rule] is not None]
        correct = sum(1 for e in answered if e["preds"][rule] == e["label"])
        rows.append(
            {
                "rule": rule,
                "f": f,
                "attack": attack,
                "mode": "gathered",
                "accuracy": round(correct / len(events), 6) if events else None,
                "requests": len(events),
                "answered": len(answered),
                "errors": len(events) - len(answered),
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
                "ballots_mean": round(
                    sum(len(e["ballots"]) for e in events) / max(1, len(events)), 3
                ),
                "liar_replies": liar_replies,
                "liar_rejected": sum(liar_rejected.values()),
                "liar_counted": liar_counted,
                "rejection_reasons": dict(liar_rejected),
                "honest_rejected": honest_rejected,
            }
        )
    return rows


async def run(cluster: Cluster, scenario: Scenario, progress: Any = None) -> Report:
    params = scenario.params
    fs = [int(f) for f in params.get("f", [0, 1, 2, 3])]
    attacks = [str(a) for a in params.get("attacks", ATTACKS)]
    tgt = int(params.get("target", DEFAULT_TARGET))
    live_images = min(scenario.images, int(params.get("live_images", scenario.images)))
    extra = {
        p.name: ["--claim-runs", _claim_runs(p.variant)]
        for p in scenario.peers
        if p.agent and p.variant != "auto"
    }
    procs, (driver,) = await start_swarm(cluster, scenario, extra_args=extra)
    agents = [p for p in procs.values() if p.kind == "agent"]
    if max(fs) > len(agents):
        raise ValueError(f"f up to {max(fs)} needs as many agents; the scenario has {len(agents)}")
    indices = list(range(scenario.images))
    deadline = scenario.deadline_ms
    results: list[dict[str, Any]] = []
    passes = [(0, "none")] + [(f, a) for a in attacks for f in fs if f > 0]
    if progress is not None:
        progress.reset(total=len(passes) * (len(indices) + live_images))
    clean: float | None = None
    for f, attack in passes:
        liars = agents[:f]
        await _set_liars(liars, agents, attack if f else HONEST, tgt)
        liar_ids = {p.peer_id for p in liars}
        gathered = await _run(
            driver, {"cmd": "gather", "indices": indices, "deadline_ms": deadline}, progress
        )
        rows = _rows(gathered, f, attack, liar_ids)
        live = await _run(
            driver,
            {
                "cmd": "classify",
                "indices": indices[:live_images],
                "rule": "robust",
                "replicas": "all",
                "deadline_ms": deadline,
                "fresh_reputation": True,
            },
            progress,
        )
        live_row = summarize(live, rule="robust", f=f, attack=attack, mode="live")
        live_row["liar_counted"] = sum(
            1 for e in live for p in e.get("replies", []) if p in liar_ids
        )
        if f == 0:
            clean = next(r["accuracy"] for r in rows if r["rule"] == "sum")
        results += [*rows, live_row]
        log.info(
            "byzantine_pass",
            f=f,
            attack=attack,
            **{r["rule"]: r["accuracy"] for r in rows},
            live=live_row["accuracy"],
        )
    await _set_liars([], agents, HONEST, tgt)
    return Report(
        scenario.name,
        scenario.kind,
        len(procs),
        scenario.images,
        clean,
        results,
        extra={
            "method": __doc__.split("Method (stated in the report too). ")[1]
            .split("\n\nParams")[0]
            .replace("\n", " "),
            "liars": [p.name for p in agents[: max(fs)]],
            "variants": {p.name: p.ready.get("variant") for p in procs.values()},
        },
        targets=_targets(results, clean, float(params.get("tolerance", 0.0))),
    )


async def _run(driver: Driver, cmd: dict[str, Any], progress: Any) -> list[dict[str, Any]]:
    events = []
    timeout = len(cmd["indices"]) * (cmd["deadline_ms"] / 1000 + 0.5) + 60
    await driver.send(cmd)
    async for event in driver.events(timeout):
        events.append(event)
        if progress is not None:
            progress.update(1)
    return events


def _targets(
    results: list[dict[str, Any]],
    clean: float | None,
    tolerance: float = 0.0,
) -> list[dict[str, Any]]:
    """The issue's targets; ``tolerance`` widens accuracy bounds for short runs."""
    out: list[dict[str, Any]] = []
    if clean is None:
        return out

    def acc(rule: str, f: int, attack: str, mode: str = "gathered") -> float | None:
        for r in results:
            if (r["rule"], r["f"], r["attack"], r["mode"]) == (rule, f, attack, mode):
                return r["accuracy"]  # type: ignore[no-any-return]
        return None

    # A rule's loss is measured against its own accuracy on the clean swarm (f = 0).
    for f, slack in ((2, 0.01), (3, 0.03)):
        robust, total = acc("robust", f, "collude"), acc("sum", f, "collude")
        robust0, total0 = acc("robust", 0, "none"), acc("sum", 0, "none")
        if robust is None or total is None or robust0 is None or total0 is None:
            continue
        out.append(
            target(
                f"robust >= clean - {slack * 100:.0f} pt, f={f} colluding liars",
                robust >= clean - slack - tolerance,
                f"robust {robust:.4f}, clean (sum, f=0) {clean:.4f}",
            )
        )
        out.append(
            target(
                f"sum loses more than robust, f={f} colluding liars",
                total0 - total > robust0 - robust,
                f"sum {total0:.4f} -> {total:.4f}, robust {robust0:.4f} -> {robust:.4f}",
            )
        )
    for attack in REJECT_ATTACKS:
        rows = [
            r
            for r in results
            if r["attack"] == attack and r["rule"] == "robust" and r["mode"] == "gathered"
        ]
        if not rows:
            continue
        sent = sum(r["liar_replies"] for r in rows)
        rejected = sum(r["liar_rejected"] for r in rows)
        counted = sum(r["liar_counted"] for r in rows)
        reasons = Counter[str]()
        for r in rows:
            reasons.update(r["rejection_reasons"])
        expected = EXPECTED_REJECTION[attack]
        out.append(
            target(
                f"{attack}: 100% rejected ({expected}), none counted",
                sent > 0 and rejected == sent and counted == 0 and set(reasons) == {expected},
                f"{rejected}/{sent} rejected, {counted} counted, reasons {dict(reasons)}",
            )
        )
    return out
