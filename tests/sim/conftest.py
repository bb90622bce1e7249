"""Helpers for the simulator's tests: run a short scenario and prove it left nothing behind."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sim import netns
from sim.runners.common import Report
from swarm.log import reset_logging

NETNS_OK, NETNS_WHY = netns.available()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """A command's main() run in-process configures logging for the process (its level
    among it): put the defaults back for the next test."""
    yield
    reset_logging()


needs_netns = pytest.mark.skipif(not NETNS_OK, reason=NETNS_WHY or "netns available")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose but still has a pid: read its state.
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def assert_nothing_left(out: Path) -> dict[str, Any]:
    """Every process the sim started is gone, and so is every namespace of its lab."""
    state: dict[str, Any] = json.loads((out / "state.json").read_text())
    assert state["running"] is False
    pids = [p["pid"] for p in state["procs"].values() if p["pid"] is not None]
    assert pids, "the sim started no process"
    assert [pid for pid in pids if pid_alive(pid)] == []
    if state["lab"] is not None:
        assert netns.namespaces(f"{netns.PREFIX}{state['lab']['tag']}") == []
    return state


def targets(report: Report) -> dict[str, bool]:
    return {t["target"]: t["ok"] for t in report.targets}
