"""``python -m sim.benchmarks.echo``: a trivial aiohttp handler on 127.0.0.1.

The floor's network term is one keep-alive round trip to this server, in a process of
its own like a peer. It prints its port on stdout and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

from aiohttp import web

from swarm import aio

LOOPBACK = "127.0.0.1"
REPLY = b"x" * 600  # about the size of a signed top-2 reply


async def _ok(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=REPLY)


async def serve() -> None:
    app = web.Application()
    app.router.add_post("/", _ok)
    await serve_app(app)


async def serve_app(app: web.Application, extra: str = "") -> None:
    """Serve ``app`` on 127.0.0.1, print its port (and ``extra``) on stdout, serve until
    SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    await web.SockSite(runner, sock).start()
    port = sock.getsockname()[1]
    sys.stdout.write(f"{port} {extra}".rstrip() + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    aio.run(serve())
