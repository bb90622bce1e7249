"""Short versions of every scenario, on real peer processes: the issue's targets, scaled to
a few images, and nothing left behind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sim.run import run
from sim.scenario import VARIANTS, Fault, builtin, load
from tests.sim.conftest import assert_nothing_left, needs_netns, targets

pytestmark = pytest.mark.slow
SCENARIOS = Path(__file__).resolve().parents[2] / "sim" / "scenarios"


async def test_byzantine_short_meets_the_targets(tmp_path: Path) -> None:
    images = 40
    sc = dataclasses.replace(
        builtin("byzantine"),
        images=images,
        params={
            "f": [0, 2, 3],
            "attacks": ["collude", "replay", "misbind", "forge", "claim"],
            "live_images": 10,
            "tolerance": 2 / images,
        },
    )
    rep = await run(sc, tmp_path, use_netns=False, progress=False)
    ok = targets(rep)
    assert ok["robust >= clean - 1 pt, f=2 colluding liars"], rep.targets
    assert ok["robust >= clean - 3 pt, f=3 colluding liars"], rep.targets
    for attack in ("replay", "misbind", "forge", "claim"):
        key = next(k for k in ok if k.startswith(f"{attack}: 100% rejected"))
        assert ok[key], rep.targets
    rules = {r["rule"] for r in rep.results}
    assert rules == {"robust", "sum", "vote", "trimmed", "median"}
    assert rep.peers == 7 and rep.clean_accuracy is not None and rep.clean_accuracy > 0.85
    assert_nothing_left(tmp_path)


async def test_crash_short_loses_no_request(tmp_path: Path) -> None:
    sc = dataclasses.replace(
        builtin("crash"),
        images=200,
        faults=(
            Fault(1.0, "kill", "p1"),
            Fault(1.3, "kill", "p2"),
            Fault(1.6, "kill", "p3"),
            Fault(2.5, "restart", "p1"),
            Fault(2.5, "restart", "p3"),
        ),
        params={"interval_ms": 25},
    )
    rep = await run(sc, tmp_path, use_netns=False, progress=False)
    assert all(t["ok"] for t in rep.targets), rep.targets
    assert len(rep.targets) == 3
    assert rep.extra["restarts"] and rep.results[0]["min_alive"] == len(VARIANTS) - 3
    assert_nothing_left(tmp_path)


async def test_straggler_short_keeps_p99_within_the_deadline(tmp_path: Path) -> None:
    sc = dataclasses.replace(
        builtin("straggler"),
        images=40,
        deadline_ms=600,
        params={"delay_ms": 200, "no_early_exit_images": 3},
    )
    rep = await run(sc, tmp_path, use_netns=False, progress=False)
    ok = targets(rep)
    assert next(v for k, v in ok.items() if "p99 within the deadline" in k), rep.targets
    phases = {r["phase"]: r for r in rep.results}
    assert phases["hang"]["lost"] == 0
    # Without early exit, a hung peer costs the whole deadline on every request.
    assert phases["hang, no-early-exit"]["p50_ms"] >= 600
    assert_nothing_left(tmp_path)


async def test_paper_short_reports_combinations_and_response_times(tmp_path: Path) -> None:
    sc = dataclasses.replace(
        builtin("paper"), images=20, params={"subsets": "loo", "latency_runs": 30}
    )
    rep = await run(sc, tmp_path, use_netns=False, progress=False)
    n = len(VARIANTS)
    assert n >= 5
    assert len(rep.extra["combinations"]) == 2 * n + 1  # each alone, all, each left out
    assert len(rep.extra["leave_one_out"]) == n
    timing = {t["model"]: t for t in rep.extra["response_time"]}
    assert set(timing) == {"reference", *VARIANTS}
    assert all(timing[v]["macs_gain"] > 5 and timing[v]["params_gain"] > 3 for v in VARIANTS)
    assert all(r["lost"] == 0 for r in rep.results)
    assert (tmp_path / "accuracy_vs_macs.png").exists()
    assert_nothing_left(tmp_path)


@pytest.mark.netns
@needs_netns
async def test_crash_short_in_namespaces(tmp_path: Path) -> None:
    sc = dataclasses.replace(
        builtin("crash"),
        images=150,
        faults=(Fault(1.0, "kill", "p1"), Fault(2.0, "restart", "p1")),
        params={"interval_ms": 25},
    )
    rep = await run(sc, tmp_path, use_netns=True, progress=False)
    assert rep.extra["network"] == "netns"
    assert all(t["ok"] for t in rep.targets), rep.targets
    assert_nothing_left(tmp_path)


@pytest.mark.netns
@needs_netns
async def test_partition_short_each_side_answers(tmp_path: Path) -> None:
    sc = dataclasses.replace(builtin("partition"), images=15)
    rep = await run(sc, tmp_path, use_netns=True, progress=False)
    parted = [r for r in rep.results if r["phase"] == "partitioned"]
    assert len(parted) == 2 and all(r["answered"] >= 14 for r in parted), rep.results
    # Each side answers with the variants on its side of the split, and only those.
    assert {r["side"]: r["variants_used"] for r in parted} == {"A": "V1+V2+V3", "B": "V1+V4+V5"}
    assert all(t["ok"] for t in rep.targets), rep.targets
    assert_nothing_left(tmp_path)


async def test_churn_short_loses_no_request(tmp_path: Path) -> None:
    sc = dataclasses.replace(
        builtin("churn"), images=150, params={"interval_ms": 20, "period_s": 1.0, "tail_images": 60}
    )
    rep = await run(sc, tmp_path, use_netns=False, progress=False)
    assert [f["action"] for f in rep.extra["faults"]][:2] == ["stop", "restart"]
    assert rep.results[0]["lost"] == 0 and rep.results[0]["answered"] >= 0.99 * 210
    assert_nothing_left(tmp_path)


async def test_toml_scenario_with_profiles_runs(tmp_path: Path) -> None:
    sc = load(SCENARIOS / "heterogeneous-crash.toml").with_options(images=120)
    rep = await run(sc, tmp_path, use_netns=False, progress=False)
    assert rep.scenario == "heterogeneous-crash"
    assert rep.results[0]["lost"] == 0
    state = assert_nothing_left(tmp_path)
    served = sorted(p["variant"] for n, p in state["procs"].items() if n != "driver")
    # Four peers name V1-V4; the fifth, "auto", took a variant nobody served yet.
    assert served[:4] == ["V1", "V2", "V3", "V4"], served
    assert len(served) == 5 and served[4] in set(VARIANTS) - set(served[:4]), served
