"""Scenario files, schedules and the statistics every report is built from."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim import report
from sim.runners.churn import schedule
from sim.runners.common import Report, percentile, summarize
from sim.runners.crash import alive_at, reuse_delays
from sim.scenario import BUILTIN, ScenarioError, builtin, load

TOML = """
name = "mine"
kind = "crash"
images = 50
deadline_ms = 800
[profiles.slow]
cpus = [0]
threads = 1
slowdown = 3.0
[[peers]]
variant = "V1"
[[peers]]
variant = "auto"
profile = "slow"
[[faults]]
at_s = 2.0
action = "restart"
peer = "p0"
[[faults]]
at_s = 1.0
action = "kill"
peer = "p0"
[params]
interval_ms = 10
"""


def test_toml_scenario_parses_profiles_peers_and_sorted_faults(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(TOML)
    sc = load(path)
    assert (sc.name, sc.kind, sc.images, sc.deadline_ms) == ("mine", "crash", 50, 800)
    assert sc.peers[1].profile.slowdown == 3.0
    assert sc.peers[1].agent  # a slowdown needs the sim agent
    assert [f.action for f in sc.faults] == ["kill", "restart"]
    assert sc.params == {"interval_ms": 10}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('kind = "nope"\n[[peers]]\nvariant = "V1"\n', "kind must be"),
        ('kind = "crash"\n', "at least one"),
        ('kind = "crash"\n[[peers]]\nvariant = "V9"\n', "variant must be"),
        (
            'kind = "crash"\n[[peers]]\nvariant = "V1"\n[[faults]]\nat_s = 1\naction = "kill"\n'
            'peer = "p7"\n',
            "unknown peer",
        ),
        ("kind = [", "cannot read"),
    ],
)
def test_bad_scenarios_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=message):
        load(path)


def test_builtins_and_overrides() -> None:
    assert set(BUILTIN) == {"paper", "byzantine", "crash", "straggler", "partition", "churn"}
    byz = builtin("byzantine").with_options(peers=9, images=10)
    assert len(byz.peers) == 9 and byz.images == 10
    assert [p.agent for p in byz.peers[:4]] == [True, True, True, False]
    with pytest.raises(ScenarioError, match="unknown scenario"):
        builtin("nope")


def test_churn_schedule_leaves_then_rejoins_within_the_run() -> None:
    faults = schedule(["p0", "p1"], period_s=1.0, duration_s=3.5)
    assert [(f.at_s, f.action, f.peer) for f in faults] == [
        (0.5, "stop", "p0"),
        (1.0, "restart", "p0"),
        (1.5, "stop", "p1"),
        (2.0, "restart", "p1"),
        (2.5, "stop", "p0"),
        (3.0, "restart", "p0"),
    ]


def test_alive_count_and_reuse_delay_follow_the_faults() -> None:
    applied = [
        {"action": "kill", "peer": "p1", "peer_id": "a", "t": 10.0},
        {"action": "restart", "peer": "p1", "peer_id": "a", "t": 12.0},
    ]
    assert [alive_at(t, 3, applied) for t in (9.0, 11.0, 12.5)] == [3, 2, 3]
    events = [{"t": 12.1, "replies": ["b"]}, {"t": 12.7, "replies": ["a", "b"]}]
    assert reuse_delays(events, applied) == [{"peer": "p1", "ready_t": 12.0, "used_again_s": 0.7}]
    assert reuse_delays(events[:1], applied)[0]["used_again_s"] is None


def test_summary_counts_lost_requests_and_percentiles() -> None:
    events = [
        {"pred": 1, "label": 1, "latency_ms": 10.0, "error": None},
        {"pred": 2, "label": 1, "latency_ms": 30.0, "error": None},
        {"pred": None, "label": 1, "latency_ms": 5.0, "error": "NoDecisionError: none"},
        {"pred": None, "label": 1, "latency_ms": 5.0, "error": None},
    ]
    row = summarize(events, rule="robust")
    assert (row["requests"], row["answered"], row["errors"], row["lost"]) == (4, 2, 1, 1)
    assert row["accuracy"] == 0.25
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([], 99) is None


def test_report_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    rows = [
        {
            "rule": r,
            "f": f,
            "attack": a,
            "mode": "gathered",
            "accuracy": 0.9,
            "requests": 1,
            "answered": 1,
            "errors": 0,
            "p50_ms": 1.0,
            "p99_ms": 2.0,
        }
        for r in ("sum", "robust")
        for f, a in ((0, "none"), (1, "collude"))
    ]
    rep = Report(
        "byzantine",
        "byzantine",
        7,
        1,
        0.9,
        rows,
        targets=[{"target": "t", "ok": True, "detail": "d"}],
    )
    files = report.write(rep, tmp_path)
    assert {f.name for f in files} == {"report.json", "report.md", "byzantine.png", "report.html"}
    assert "PASS: t" in (tmp_path / "report.md").read_text()
    assert '<img src="byzantine.png"' in (tmp_path / "report.html").read_text()
