"""The command lines: sim.faults breaks a live sim by hand; sim.run cleans up on Ctrl-C
and refuses bad scenarios."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sim import control
from sim.procs import Cluster
from tests.sim.conftest import assert_nothing_left, needs_netns, pid_alive

pytestmark = pytest.mark.slow
STATE_TIMEOUT_S = 60.0


def faults(out: Path, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "sim.faults", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
async def agent_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with Cluster(tmp_path, use_netns=False) as cluster:
        await cluster.add_peer("p0", "V1", agent=True)
        await cluster.add_peer("p1", "V2")
        yield cluster
    assert_nothing_left(tmp_path)


def _state_letter(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    raise AssertionError("no State line")


async def test_faults_cli_changes_a_live_agent_and_signals_peers(
    agent_cluster: Cluster, tmp_path: Path
) -> None:
    rc, text = await asyncio.to_thread(faults, tmp_path, "byzantine", "p0", "collude")
    assert rc == 0, text
    assert (await control.get_state(agent_cluster.procs["p0"].control or Path()))[
        "attack"
    ] == "collude"
    rc, text = await asyncio.to_thread(faults, tmp_path, "slow", "p0", "--factor", "3")
    assert rc == 0 and json.loads(text)["slowdown"] == 3.0
    rc, text = await asyncio.to_thread(faults, tmp_path, "slow", "p1", "--factor", "3")
    assert rc == 1 and "real swarm.peer" in text
    pid = agent_cluster.procs["p1"].pid
    assert pid is not None
    rc, _ = await asyncio.to_thread(faults, tmp_path, "pause", "p1")
    assert rc == 0 and _state_letter(pid) == "T"
    rc, _ = await asyncio.to_thread(faults, tmp_path, "resume", "p1")
    assert rc == 0 and _state_letter(pid) != "T"
    rc, text = await asyncio.to_thread(faults, tmp_path, "partition", "p0", "p1")
    assert rc == 1 and "loopback" in text
    rc, text = await asyncio.to_thread(faults, tmp_path, "kill", "p9")
    assert rc == 1 and "no process 'p9'" in text
    rc, _ = await asyncio.to_thread(faults, tmp_path, "kill", "p1")
    assert rc == 0
    process = agent_cluster.procs["p1"].process
    assert process is not None
    assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL


def test_run_refuses_an_unknown_scenario(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sim.run", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "unknown scenario" in done.stderr


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    log = tmp_path / "sim.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sim.run",
                "crash",
                "--loopback",
                "--no-progress",
                "--out",
                str(tmp_path),
                "--images",
                "100000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        # The sim rewrites state.json as each process gets ready; the driver comes last.
        # Another process's file cannot be awaited: poll it, bounded.
        state_file = tmp_path / "state.json"
        for _ in range(int(STATE_TIMEOUT_S / 0.2)):
            if state_file.exists() and "driver" in json.loads(state_file.read_text())["procs"]:
                break
            assert proc.poll() is None, log.read_text()
            subprocess.run(["sleep", "0.2"], check=True)
        else:
            pytest.fail("the sim did not start its driver")
        pids = [p["pid"] for p in json.loads(state_file.read_text())["procs"].values()]
        assert all(pid_alive(pid) for pid in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_nothing_left(tmp_path)


def _master(hub: str, port: str) -> str:
    out = subprocess.run(
        ["ip", "-n", hub, "-o", "link", "show", port],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return out.split(" master ")[1].split()[0]


@pytest.mark.netns
@needs_netns
async def test_faults_cli_partitions_and_heals_a_namespaced_sim(tmp_path: Path) -> None:
    async with Cluster(tmp_path, use_netns=True) as cluster:
        await asyncio.gather(cluster.add_peer("p0", "V1"), cluster.add_peer("p1", "V2"))
        assert cluster.lab is not None
        hub, hosts = cluster.lab.hub, cluster.lab.hosts
        rc, text = await asyncio.to_thread(faults, tmp_path, "partition", "p0", "p1")
        assert rc == 0, text
        assert _master(hub, hosts["p0"].port) != _master(hub, hosts["p1"].port)
        rc, text = await asyncio.to_thread(faults, tmp_path, "partition", "p0", "p1")
        assert rc == 0, text  # a second split reuses the bridges the first one made
        rc, text = await asyncio.to_thread(faults, tmp_path, "heal")
        assert rc == 0, text
        assert _master(hub, hosts["p0"].port) == _master(hub, hosts["p1"].port) == "br0"
    assert_nothing_left(tmp_path)
