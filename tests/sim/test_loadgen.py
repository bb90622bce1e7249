"""Tests of ``sim.benchmarks.loadgen``: requesters in processes of their own share a load,
say what is wrong with a bad command, and leave nothing running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.benchmarks.fleet import Fleet
from sim.benchmarks.loadgen import LoadGens, _command, split
from tests.sim.conftest import pid_alive

VARIANTS = ("V1", "V2", "V3")


def test_split_shares_evenly_larger_first() -> None:
    assert split(32, 4) == [8, 8, 8, 8]
    assert split(10, 4) == [3, 3, 2, 2]
    assert split(1, 3) == [1, 0, 0]
    assert sum(split(1001, 7)) == 1001
    with pytest.raises(ValueError, match="cannot split 4 among 0"):
        split(4, 0)


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"not json\n", "one JSON object per line"),
        (b"[1, 2]\n", "a JSON object"),
        (b'{"count": -1, "concurrency": 1}\n', "'count' must be an integer >= 0"),
        (b'{"count": 3, "concurrency": 0}\n', "'concurrency' must be an integer >= 1"),
        (b'{"count": 3.5, "concurrency": 2}\n', "'count' must be an integer >= 0"),
    ],
)
def test_bad_command_says_what_is_wrong(line: bytes, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        _command(line)


async def test_loadgens_share_a_load_and_stop(tmp_path: Path) -> None:
    """Two processes split 24 calls at concurrency 4; at concurrency 1 only one runs; a
    bad command gets an error line and the process goes on; all exit on close."""
    async with Fleet(tmp_path / "fleet") as fleet:
        await fleet.start(VARIANTS)
        async with LoadGens(fleet.swarm, 2, tmp_path / "gens", peers=len(VARIANTS)) as gens:
            pids = gens.pids
            shared = await gens.loop(count=24, concurrency=4)
            assert shared["requesters"] == 2
            assert shared["failures"] == 0  # three live peers on loopback decide each call
            assert len(shared["latencies_ms"]) == 24
            assert shared["cpu_s"] > 0 and shared["wall_s"] > 0
            alone = await gens.loop(count=5, concurrency=1)
            assert alone["requesters"] == 1
            assert len(alone["latencies_ms"]) + alone["failures"] == 5
            stdin = gens.processes[1].stdin
            assert stdin is not None
            stdin.write(b'{"count": "many"}\n')
            said = await gens._line(1, 30)
            assert "'count' must be an integer" in said["error"]
            again = await gens.loop(count=8, concurrency=2)
            assert len(again["latencies_ms"]) + again["failures"] == 8
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert all(p.returncode == 0 for p in gens.processes)
    assert json.dumps(shared)  # a plain JSON value, as bench.json stores it
