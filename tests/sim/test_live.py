"""Tests of sim.live: a running scenario's page, in-process and through ``sim.run --serve``."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sim.live import LiveRun, LiveServer
from sim.procs import Cluster, Proc, SimError
from sim.screenshots import CHROMIUM, CHROMIUM_ARGS
from tests.sim.conftest import assert_nothing_left

ROOT = Path(__file__).resolve().parents[2]


async def sse(resp: aiohttp.ClientResponse, count: int, timeout_s: float = 10) -> list[Any]:
    """The next ``count`` Server-Sent Events of a stream, as (event, data)."""
    out: list[tuple[str, Any]] = []
    name = ""
    async with asyncio.timeout(timeout_s):
        while len(out) < count:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[len("data: ") :])))
    return out


def fake_cluster(out: Path) -> Cluster:
    cluster = Cluster(out, use_netns=False)
    proc = Proc("p0", "peer", [], "127.0.0.1", None, out, out / "p0.log")
    proc.ready = {"port": 4321, "variant": "V1", "peer_id": "ab" * 10}
    cluster.procs["p0"] = proc
    return cluster


async def test_page_streams_results_faults_and_state(tmp_path: Path) -> None:
    """A page gets the run so far on connect, then each result and fault as it happens,
    and the processes' state; it is served on 127.0.0.1 only."""
    run = LiveRun("crash", tmp_path)
    run.cluster = fake_cluster(tmp_path)
    run.observe({"kind": "result", "i": 1, "label": 3, "pred": 3, "t": 1.0})
    async with LiveServer(run, 0) as server, aiohttp.ClientSession() as session:
        assert server.url.startswith("http://127.0.0.1:")
        page = await session.get(server.url)
        assert page.status == 200
        assert '<script src="/live.js"' in await page.text()
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        for path in ("live.js", "live.css", "style.css"):
            assert (await session.get(server.url + path)).status == 200
        async with session.get(server.url + "events") as stream:
            [(name, hello)] = await sse(stream, 1)
            assert name == "hello"
            assert (hello["scenario"], len(hello["events"])) == ("crash", 1)
            run.observe({"kind": "fault", "action": "kill", "peer": "p0", "t": 2.0})
            got = await sse(stream, 2)
            names = [n for n, _ in got]
            assert "fault" in names
            assert "state" in names
            state = next(d for n, d in got if n == "state")
            assert state["procs"][0]["name"] == "p0"
            assert state["procs"][0]["address"] == "127.0.0.1:4321"
            assert state["procs"][0]["alive"] is False  # never started
            assert state["report"] is False


async def test_report_files_only_once_written_and_by_name(tmp_path: Path) -> None:
    """The run's report and plots are served by bare name once they exist; nothing else
    of the folder is."""
    run = LiveRun("crash", tmp_path)
    (tmp_path / "state.json").write_text("{}")
    async with LiveServer(run, 0) as server, aiohttp.ClientSession() as session:
        assert (await session.get(server.url + "run/report.html")).status == 404
        (tmp_path / "report.html").write_text("<h1>report</h1>")
        (tmp_path / "timeline.png").write_bytes(b"png")
        resp = await session.get(server.url + "run/report.html")
        assert (resp.status, await resp.text()) == (200, "<h1>report</h1>")
        assert (await session.get(server.url + "run/timeline.png")).status == 200
        for name in ("state.json", "..%2Fsecret.png", "logs"):
            assert (await session.get(server.url + "run/" + name)).status == 404


async def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """A --serve port that is taken: a SimError naming it and what to do."""
    run = LiveRun("crash", tmp_path)
    async with LiveServer(run, 0) as first:
        with pytest.raises(SimError, match="pass another --serve port"):
            async with LiveServer(run, first.port):
                pass


@pytest.mark.slow
async def test_sim_run_serve_shows_the_run_then_stops_on_ctrl_c(tmp_path: Path) -> None:
    """``sim.run crash --serve 0``: the page streams the driver's results and the peers
    killed and restarted; after the run it offers the report and stays until Ctrl-C, which
    then ends the process with the run's status, leaving nothing behind."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sim.run", "crash", "--loopback", "--no-progress"),
        *("--serve", "0", "--images", "30", "--out", str(tmp_path / "run")),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            line = (await proc.stderr.readline()).decode()
        assert line.startswith("live: http://127.0.0.1:"), line
        url = line.split()[1]
        seen: dict[str, int] = {}
        async with aiohttp.ClientSession() as session, session.get(url + "events") as stream:
            report = False
            async with asyncio.timeout(240):
                while not report:
                    for name, data in await sse(stream, 1, timeout_s=240):
                        seen[name] = seen.get(name, 0) + 1
                        if name == "fault":
                            seen[data["action"]] = seen.get(data["action"], 0) + 1
                        report = name == "state" and data["report"] and data["finished"]
            assert seen.get("result", 0) >= 30
            assert seen.get("kill", 0) >= 1
            assert seen.get("restart", 0) >= 1
            resp = await session.get(url + "run/report.html")
            assert resp.status == 200
            assert "Scenario crash" in await resp.text()
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            rest = (await proc.stderr.read()).decode()
            code = await proc.wait()
        assert code in (0, 1), rest  # the run's targets decide, not the interruption
        assert "the run is over" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert_nothing_left(tmp_path / "run")


async def test_an_agent_turning_faulty_is_an_event(tmp_path: Path) -> None:
    """An agent whose faults the runner changes (through its control socket) shows them,
    and each change is a fault event naming what changed, once."""
    mode = {"attack": "honest", "target": 0, "slowdown": 1.0, "delay_ms": 0.0}

    async def state(request: web.Request) -> web.Response:
        return web.json_response(mode)

    app = web.Application()
    app.router.add_get("/state", state)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "agent.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        run = LiveRun("byzantine", tmp_path)
        cluster = fake_cluster(tmp_path)
        agent = Proc("p1", "agent", [], "127.0.0.1", None, tmp_path, tmp_path / "p1.log")
        agent.control = sock
        agent.process = types.SimpleNamespace(returncode=None, pid=1)  # type: ignore[assignment]
        cluster.procs["p1"] = agent
        run.cluster = cluster
        await run.refresh_state()
        assert [e for e in run.history if e["kind"] == "fault"] == []
        mode["attack"] = "collude"
        await run.refresh_state()
        await run.refresh_state()
        faults = [e for e in run.history if e["kind"] == "fault"]
        assert [(e["peer"], e["action"]) for e in faults] == [("p1", "attack collude")]
        procs = {p["name"]: p for p in run.state["procs"]}
        assert procs["p1"]["mode"]["attack"] == "collude"
    finally:
        await runner.cleanup()


@pytest.mark.slow
def test_live_page_in_a_browser_shows_the_run(tmp_path: Path) -> None:
    """The live page of ``sim.run crash --serve 0`` in headless Chromium: no console error,
    every process listed, the kills on the event list and the chart, the report linked
    once the run is over."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright missing")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    err = (tmp_path / "sim.err").open("w+")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "sim.run", "crash", "--loopback", "--no-progress"),
            *("--serve", "0", "--images", "20", "--out", str(tmp_path / "run")),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    try:
        url = ""
        for _ in range(300):
            err.seek(0)
            first = err.readline()
            if first.startswith("live: "):
                url = first.split()[1]
                break
            assert proc.poll() is None, err.read()
            time.sleep(0.1)
        assert url, "sim.run did not print the page's address"
        problems: list[str] = []
        with playwright_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS)
            )
            page = browser.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.set_default_timeout(240_000)
            page.goto(url)
            page.wait_for_selector("#report a[href='/run/report.html']")
            assert page.locator("#status").inner_text() == "finished"
            names = page.locator("#procs tr td:first-child").all_inner_texts()
            assert {"p0", "p1", "driver"} <= set(names)
            events = page.locator("#events li").all_inner_texts()
            assert any(": kill" in e for e in events), events
            assert page.locator("#chart polyline.line").count() == 1
            assert page.locator("#chart line.fault").count() >= 2
            assert "NaN" not in page.locator("#chart").inner_html()
            browser.close()
        assert problems == []
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) in (0, 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    assert_nothing_left(tmp_path / "run")
