"""The page every peer serves at ``GET /``: the swarm as this peer sees it, live.

Routes (mounted by ``swarm.http.api.create_app`` when the peer runs with ``--ui on``):

- ``GET /``: the page (``static/index.html``), and ``GET /ui/app.js``, ``/ui/style.css``;
- ``GET /ui/state``: one JSON snapshot (this peer, its peers, its numbers, the recent
  decisions), for scripts and for a page that cannot stream;
- ``GET /ui/events``: the same live, as Server-Sent Events: ``hello`` (the snapshot) on
  connect, ``decision`` for each classify call this peer finishes as requester, and
  ``state`` (peers and numbers) every ``PageSources.tick_s``.

The page classifies through the existing ``POST /v1/classify`` (its size, rate and decode
limits and errors); it adds no other route that changes anything. The static files are
read once, at startup, from the package; nothing is fetched from elsewhere, and the
Content-Security-Policy lets the page load nothing but this peer's own files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from swarm.errors import ConfigError
from swarm.http.view import PageSources, peers_view, self_view, stats_view
from swarm.log import get_logger
from swarm.requester.events import FeedFullError

log = get_logger(__name__)

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
# Served name -> (file in STATIC_DIR, content type). A fixed set: no path from a request
# ever reaches the file system.
ASSETS: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_RETRY_MS: Final = 2000  # EventSource reconnects after this long when a stream ends
_RETRY_AFTER_S: Final = 5


def load_assets(directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """The page's files, read once; ConfigError when the package lacks one."""
    assets: dict[str, tuple[bytes, str]] = {}
    for route, (name, content_type) in ASSETS.items():
        try:
            assets[route] = ((directory / name).read_bytes(), content_type)
        except OSError as exc:
            raise ConfigError(
                f"the page's file {directory / name} cannot be read ({exc.strerror}); "
                "reinstall the package, or run the peer with --ui off"
            ) from exc
    return assets


def snapshot(src: PageSources) -> dict[str, Any]:
    """Everything the page shows at one moment."""
    return {
        "self": self_view(src),
        "peers": peers_view(src),
        "stats": stats_view(src),
        "decisions": [entry.to_json() for entry in src.feed.recent()],
    }


class _Page:
    def __init__(self, src: PageSources, assets: dict[str, tuple[bytes, str]]) -> None:
        self.src = src
        self.assets = assets

    async def asset(self, request: web.Request) -> web.Response:
        body, content_type = self.assets[request.path]
        return web.Response(body=body, headers={"Content-Type": content_type, **_SECURITY_HEADERS})

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(snapshot(self.src), headers={"Cache-Control": "no-store"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        feed = self.src.feed
        try:
            sub = feed.subscribe()
        except FeedFullError as exc:
            return web.json_response(
                {"error": "too_many_views", "message": str(exc)},
                status=503,
                headers={"Retry-After": str(_RETRY_AFTER_S)},
            )
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        tick_s = self.src.tick_s
        try:
            await response.prepare(request)
            await response.write(f"retry: {_RETRY_MS}\n\n".encode())
            await _send(response, "hello", snapshot(self.src))
            log.debug("page_stream_opened", remote=request.remote)
            next_tick = time.monotonic() + tick_s
            while not sub.ended:
                entries = await sub.next_batch(max(0.0, next_tick - time.monotonic()))
                for entry in entries:
                    await _send(response, "decision", entry.to_json())
                if time.monotonic() >= next_tick:
                    state = {"peers": peers_view(self.src), "stats": stats_view(self.src)}
                    await _send(response, "state", state)
                    next_tick = time.monotonic() + tick_s
        except ConnectionError:  # the viewer left; aiohttp raises its reset error here
            log.debug("page_stream_closed", remote=request.remote)
        finally:
            feed.unsubscribe(sub)
        return response

    async def shutdown(self, app: web.Application) -> None:
        # Streams never end by themselves: end them, or the server's shutdown would
        # wait its whole grace period for them.
        self.src.feed.close()


async def _send(response: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    try:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a NaN would break the viewer's JSON.parse; skip that one event
        log.warning("page_event_unencodable", page_event=event)
        return
    await response.write(f"event: {event}\ndata: {text}\n\n".encode())


def add_page_routes(app: web.Application, src: PageSources) -> None:
    """Mount the page's routes on a peer's application."""
    page = _Page(src, load_assets())
    for route in ASSETS:
        app.router.add_get(route, page.asset)
    app.router.add_get("/ui/state", page.state)
    app.router.add_get("/ui/events", page.events)
    app.on_shutdown.append(page.shutdown)
