"""``python -m sim.run ... --serve PORT``: a running scenario, live in a browser.

A ``LiveRun`` collects what the cluster reports (``sim.procs.Observer``): every result the
driver hands back and every fault the runner applies. ``LiveServer`` serves a page on
127.0.0.1 only: the processes and their state (alive, paused, killed; an agent's attack
or slowdown, read from its control socket), accuracy over time with the faults marked,
rejected and missing replies, and, once the run has written it, a link to its
``report.html``. Updates go over Server-Sent Events (``GET /events``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from sim import control
from sim.procs import Cluster, SimError
from swarm.log import get_logger

log = get_logger("sim.live")

HOST: Final = "127.0.0.1"  # the page never listens on a real interface
STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
SWARM_STYLE: Final = Path(__file__).resolve().parents[1] / "swarm" / "http" / "static"
HISTORY: Final = 5000  # events kept for a page opened late: a scenario's results and faults
QUEUE: Final = 1000  # events a viewer may fall behind before its stream is ended
MAX_VIEWERS: Final = 8
TICK_S: Final = 1.0
_ASSETS: Final = {
    "/": (STATIC_DIR / "live.html", "text/html; charset=utf-8"),
    "/live.js": (STATIC_DIR / "live.js", "text/javascript; charset=utf-8"),
    "/live.css": (STATIC_DIR / "live.css", "text/css; charset=utf-8"),
    "/style.css": (SWARM_STYLE / "style.css", "text/css; charset=utf-8"),
}
_HONEST: Final[dict[str, Any]] = {"attack": "honest", "slowdown": 1.0, "delay_ms": 0.0}
_REPORT_FILES: Final = ("report.html", "report.md", "report.json")
_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class _Viewer:
    """One open page's queue of events; ended when it falls ``QUEUE`` behind."""

    def __init__(self) -> None:
        self.items: collections.deque[dict[str, Any]] = collections.deque()
        self.wake = asyncio.Event()
        self.ended = False

    def push(self, event: dict[str, Any]) -> bool:
        if len(self.items) >= QUEUE:
            self.end()
            return False
        self.items.append(event)
        self.wake.set()
        return True

    def end(self) -> None:
        self.ended = True
        self.items.clear()
        self.wake.set()

    async def take(self, timeout_s: float) -> list[dict[str, Any]]:
        if not self.items and not self.ended:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self.wake.wait()
        self.wake.clear()
        items = list(self.items)
        self.items.clear()
        return items


class LiveRun:
    """The events of one run, kept (bounded) and pushed to the open pages."""

    def __init__(self, scenario: str, out: Path) -> None:
        self.scenario = scenario
        self.out = out
        self.started = time.time()
        self.finished: float | None = None
        self.cluster: Cluster | None = None
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self.state: dict[str, Any] = {}
        self._viewers: list[_Viewer] = []
        self._modes: dict[str, dict[str, Any]] = {}  # an agent's faults, last read

    def observe(self, event: dict[str, Any]) -> None:
        """A result or a fault (``sim.procs.Observer``)."""
        event.setdefault("t", time.time())  # a gather's line carries no time of its own
        self.history.append(event)
        self._push(event)

    def finish(self) -> None:
        """The run is over; its report is on disk (or it failed)."""
        self.finished = time.time()

    def _push(self, event: dict[str, Any]) -> None:
        self._viewers = [v for v in self._viewers if v.push(event)]

    def snapshot(self) -> dict[str, Any]:
        """Everything a page needs when it connects."""
        return {
            "scenario": self.scenario,
            "out": str(self.out),
            "started": self.started,
            "state": self.state,
            "events": list(self.history),
        }

    async def refresh_state(self) -> None:
        """Read the processes' state (and each agent's faults) and push it to the pages."""
        procs = []
        cluster = self.cluster
        for proc in [] if cluster is None else list(cluster.procs.values()):
            mode: dict[str, Any] = {}
            if proc.control is not None and proc.alive and not proc.paused:
                with contextlib.suppress(OSError, ValueError, TimeoutError):
                    mode = await control.get_state(proc.control)
            port = proc.ready.get("port")
            faults: dict[str, Any] = {k: mode[k] for k in _HONEST if k in mode}
            before = self._modes.get(proc.name, _HONEST)
            changed = {k: v for k, v in faults.items() if before.get(k) != v}
            if changed:
                # The runners change an agent's faults through its control socket; the
                # page learns of it here, within a tick.
                what = ", ".join(f"{k} {v}" for k, v in changed.items())
                self.observe({"kind": "fault", "action": what, "peer": proc.name})
            if faults:
                self._modes[proc.name] = faults
            procs.append(
                {
                    "name": proc.name,
                    "kind": proc.kind,
                    "variant": proc.ready.get("variant"),
                    "peer_id": proc.ready.get("peer_id"),
                    "alive": proc.alive,
                    "paused": proc.paused,
                    "address": None if port is None else f"{proc.ip}:{port}",
                    "mode": faults,
                }
            )
        self.state = {
            "procs": procs,
            "finished": self.finished,
            "report": (self.out / "report.html").is_file(),
        }
        self._push({"kind": "state", **self.state})

    def subscribe(self) -> _Viewer | None:
        """A new page's queue; None when ``MAX_VIEWERS`` are open."""
        if len(self._viewers) >= MAX_VIEWERS:
            return None
        viewer = _Viewer()
        self._viewers.append(viewer)
        return viewer

    def unsubscribe(self, viewer: _Viewer) -> None:
        viewer.end()
        if viewer in self._viewers:
            self._viewers.remove(viewer)

    def close(self) -> None:
        for viewer in self._viewers:
            viewer.end()
        self._viewers.clear()


class LiveServer:
    """Serves a ``LiveRun``'s page on 127.0.0.1; ``port`` 0 picks a free one."""

    def __init__(self, run: LiveRun, port: int) -> None:
        self.run = run
        self._requested = port
        self.port = 0
        app = web.Application()
        for route in _ASSETS:
            app.router.add_get(route, self._asset)
        app.router.add_get("/events", self._events)
        app.router.add_get("/run/{name}", self._run_file)
        app.on_shutdown.append(self._shutdown)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        self._ticker: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    async def __aenter__(self) -> LiveServer:
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, self._requested))
            await web.SockSite(self._runner, sock).start()
        except OSError as exc:
            sock.close()
            await self._runner.cleanup()
            raise SimError(
                f"cannot serve the live page on {HOST}:{self._requested} ({exc.strerror}); "
                "pass another --serve port (0 picks a free one)"
            ) from exc
        self.port = int(sock.getsockname()[1])
        self._ticker = asyncio.create_task(self._tick(), name="sim-live-tick")
        log.info("sim_live_serving", url=self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.wait([self._ticker])
        await self._runner.cleanup()

    async def _tick(self) -> None:
        while True:
            try:
                await self.run.refresh_state()
            except Exception:  # a page must never stop the run
                log.exception("sim_live_state_failed")
            await asyncio.sleep(TICK_S)

    async def _asset(self, request: web.Request) -> web.Response:
        path, content_type = _ASSETS[request.path]
        return web.Response(
            body=path.read_bytes(), headers={"Content-Type": content_type, **_HEADERS}
        )

    async def _run_file(self, request: web.Request) -> web.StreamResponse:
        # Only the run's report and its plots, by bare name: no path reaches the disk.
        name = request.match_info["name"]
        if name not in _REPORT_FILES and not (name.endswith(".png") and "/" not in name):
            raise web.HTTPNotFound(text=f"no such file of the run: {name[:60]}")
        path = self.run.out / name
        if not path.is_file() or path.resolve().parent != self.run.out.resolve():
            raise web.HTTPNotFound(text=f"{name[:60]} is not written yet")
        return web.FileResponse(path)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        viewer = self.run.subscribe()
        if viewer is None:
            return web.json_response(
                {"error": "too_many_views", "message": f"{MAX_VIEWERS} pages are open already"},
                status=503,
            )
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        try:
            await response.prepare(request)
            await _send(response, "hello", self.run.snapshot())
            while not viewer.ended:
                for event in await viewer.take(TICK_S * 5):
                    await _send(response, str(event.get("kind", "event")), event)
        except ConnectionError:
            pass
        finally:
            self.run.unsubscribe(viewer)
        return response

    async def _shutdown(self, app: web.Application) -> None:
        self.run.close()


async def _send(response: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    text = json.dumps(data, separators=(",", ":"), default=str)
    await response.write(f"event: {event}\ndata: {text}\n\n".encode())
