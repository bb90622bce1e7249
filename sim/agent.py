"""``python -m sim.agent``: a peer with fault hooks, built from the swarm's own parts.

An honest agent is indistinguishable from ``python -m swarm.peer``: the same identity
file, engine, mDNS announcement, link server and HTTP routes (``swarm.http.api.create_app``).
The simulator uses it only for peers that need in-process faults:

- a slowdown factor (a slower board: after each inference it sleeps ``factor - 1``
  times the time the model took) and a fixed extra delay;
- a Byzantine mode (``sim.byzantine``): its answerer rewrites each group of replies before
  signing it; ``claim`` serves another variant's engine while announcing its own.

The mode can change while it runs, through a control server on a Unix socket
(``--control PATH``; ``GET /state``, ``POST /mode`` with JSON ``{"attack", "target",
"slowdown", "delay_ms"}``). A Unix socket is reachable from the simulator in the
machine's own namespace while the agent's network stays inside its namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from sim.byzantine import HONEST, MODES, Attacker
from swarm import PROTOCOL_VERSION, aio, config
from swarm.cli.peer import serving_announcement
from swarm.crypto.identity import Identity, TrustStore
from swarm.discovery.mdns import Discovery
from swarm.discovery.table import PeerTable
from swarm.errors import SwarmError
from swarm.http.api import ServerContext, create_app
from swarm.http.listener import HttpServer
from swarm.inference.engine import Engine, InferenceResult
from swarm.inference.manifest import ModelSpec, load_manifest
from swarm.link.answer import Answerer
from swarm.link.websocket import LinkServer
from swarm.log import bind_peer, configure_logging, get_logger
from swarm.metrics import Metrics
from swarm.wire.messages import InferReply, ItemError, ReplyBatch

log = get_logger("sim.agent")

EXIT_STARTUP: Final = 2
# Bounds on injected slowness: a slower board, not a dead one (that is SIGSTOP).
MAX_SLOWDOWN: Final = 1000.0
MAX_DELAY_MS: Final = 60_000.0


@dataclasses.dataclass(slots=True)
class Faults:
    """What the agent does wrong right now; the control server changes it."""

    attacker: Attacker
    slowdown: float = 1.0
    delay_ms: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "attack": self.attacker.mode,
            "target": self.attacker.target,
            "slowdown": self.slowdown,
            "delay_ms": self.delay_ms,
            "lies": self.attacker.lies,
        }


class FaultyModel:
    """The local model as the server sees it: slowed down, or another variant (claim)."""

    def __init__(self, engine: Engine, faults: Faults, claim: Engine | None) -> None:
        self._engine = engine
        self._claim = claim
        self._faults = faults

    def _current(self) -> Engine:
        if self._faults.attacker.mode == "claim" and self._claim is not None:
            return self._claim
        return self._engine

    @property
    def spec(self) -> ModelSpec:
        return self._current().spec

    async def infer(self, x: Any) -> InferenceResult:
        result = await self._current().infer(x)
        extra_s = (self._faults.slowdown - 1.0) * result.seconds + self._faults.delay_ms / 1000
        if extra_s > 0:
            await asyncio.sleep(extra_s)
        return result


class FaultyAnswerer(Answerer):
    """The peer's answers, as its current attack rewrites them (``Attacker.tamper_batch``)."""

    def __init__(self, faults: Faults, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._faults = faults

    def sign(self, items: Sequence[InferReply | ItemError]) -> ReplyBatch:
        return self._faults.attacker.tamper_batch(super().sign(items))


def apply_mode(faults: Faults, body: object) -> None:
    """Apply a control request's changes; ValueError or TypeError says what is wrong."""
    if not isinstance(body, dict):
        raise TypeError("the body must be a JSON object")
    if "attack" in body or "target" in body:
        faults.attacker.set_mode(str(body.get("attack", faults.attacker.mode)), body.get("target"))
    slowdown = float(body.get("slowdown", faults.slowdown))
    delay = float(body.get("delay_ms", faults.delay_ms))
    if not 1.0 <= slowdown <= MAX_SLOWDOWN:
        raise ValueError(f"slowdown must be in [1, {MAX_SLOWDOWN}]")
    if not 0.0 <= delay <= MAX_DELAY_MS:
        raise ValueError(f"delay_ms must be in [0, {MAX_DELAY_MS}]")
    faults.slowdown, faults.delay_ms = slowdown, delay


def _control_app(faults: Faults) -> web.Application:
    async def state(_: web.Request) -> web.Response:
        return web.json_response(faults.as_json())

    async def mode(request: web.Request) -> web.Response:
        try:
            apply_mode(faults, await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        log.info("agent_mode", **faults.as_json())
        return web.json_response(faults.as_json())

    app = web.Application()
    app.router.add_get("/state", state)
    app.router.add_post("/mode", mode)
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim.agent", description=__doc__.split("\n")[0])
    p.add_argument("--variant", required=True, help="the variant announced (and served)")
    p.add_argument(
        "--claim-runs",
        default=None,
        metavar="NAME",
        help="the variant actually served in mode 'claim'",
    )
    p.add_argument("--interface", required=True, help="IPv4 address to listen and announce on")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--swarm", default=config.DEFAULT_SWARM)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpus", default=None, help="CPU affinity, e.g. 0,1 (a device profile)")
    p.add_argument("--slowdown", type=float, default=1.0)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--attack", choices=MODES, default=HONEST)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", type=Path, default=None, help="Unix socket of the control API")
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    return p


async def run_agent(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    timings = config.DEFAULT_TIMINGS
    identity = Identity.load_or_create(args.data_dir)
    bind_peer(identity.peer_id)
    manifest = load_manifest()
    spec = manifest.get(args.variant)
    faults = Faults(
        Attacker(identity, mode=args.attack, target=args.target, seed=args.seed),
        slowdown=args.slowdown,
        delay_ms=args.delay_ms,
    )
    table = PeerTable(args.swarm, timings=timings)
    async with contextlib.AsyncExitStack() as stack:
        engine = await stack.enter_async_context(
            Engine(
                spec,
                threads=args.threads,
                timings=timings,
                input_shape=manifest.input.shape,
                num_classes=manifest.num_classes,
            )
        )
        claim = None
        if args.claim_runs is not None:
            claim = await stack.enter_async_context(
                Engine(
                    manifest.get(args.claim_runs),
                    threads=args.threads,
                    timings=timings,
                    input_shape=manifest.input.shape,
                    num_classes=manifest.num_classes,
                )
            )
        discovery = await stack.enter_async_context(
            Discovery(table, interfaces=[args.interface], timings=timings)
        )
        model = FaultyModel(engine, faults, claim)
        metrics = Metrics()
        answerer = FaultyAnswerer(
            faults,
            identity,
            model,
            swarm=args.swarm,
            family=manifest.family_id,
            input_shape=manifest.input.shape,
        )
        links = LinkServer.build(
            identity, answerer, trust=TrustStore.open(), timings=timings, metrics=metrics
        )
        ctx = ServerContext(
            identity=identity,
            swarm=args.swarm,
            links=links,
            model=model,
            manifest=manifest,
            table=table,
            metrics=metrics,
            timings=timings,
        )
        app = create_app(ctx)
        http = await stack.enter_async_context(
            HttpServer(app, hosts=[args.interface], port=args.port, timings=timings)
        )
        control = None
        if args.control is not None:
            args.control.unlink(missing_ok=True)
            control = web.AppRunner(_control_app(faults), access_log=None)
            await control.setup()
            stack.push_async_callback(control.cleanup)
            await web.UnixSite(control, str(args.control)).start()
        await discovery.register(
            serving_announcement(args.swarm, identity, spec, http.port, manifest.family_id)
        )
        ready = {
            "event": "ready",
            "peer_id": identity.peer_id,
            "public_key": identity.public_key_b64,
            "port": http.port,
            "variant": spec.name,
            "model_sha256": spec.sha256,
            "swarm": args.swarm,
            "interfaces": [args.interface],
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "control": str(args.control) if control else None,
            "faults": faults.as_json(),
        }
        sys.stdout.write(json.dumps(ready, separators=(",", ":")) + "\n")
        sys.stdout.flush()
        log.info("agent_ready", variant=spec.name, port=http.port, **faults.as_json())
        await stop.wait()
        await http.aclose()
        await discovery.unregister()
    log.info("agent_stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, "info")
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    try:
        aio.run(run_agent(args))
    except SwarmError as exc:
        sys.stderr.write(f"python -m sim.agent: error: {exc}\n")
        return EXIT_STARTUP
    return 0


if __name__ == "__main__":
    sys.exit(main())
