"""``python -m sim.baselines.peer``: one device of a baseline swarm (a stage or a sub-model).

- ``--role stage``: one stage of the model-parallel chain. ``POST /v1/stage`` takes the
  activation (the image for the first stage), checks the requester's signature and the
  previous stage's, runs its piece, and either answers the class probabilities (last
  stage, signed) or hands its output, signed, to the next stage within what is left of
  the deadline and relays that stage's answer.
- ``--role group``: one class-parallel sub-model. ``POST /v1/group`` takes the image,
  checks the requester's signature and answers its group's probabilities, signed.

Failures answer JSON ``{"error": ...}`` with 400 (bad body), 403 (bad signature),
504 (deadline passed, or the next stage silent) or 502 (the next stage failed). When
ready it prints one JSON line (``event``, ``peer_id``, ``public_key``, ``port``, ``role``)
on stdout, as ``swarm.peer`` does, and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import numpy as np
import structlog
from aiohttp import web

from sim.baselines import wire
from swarm import aio
from swarm.crypto.identity import Identity
from swarm.log import configure_logging
from variants import runtime

log = structlog.get_logger("sim.baselines.peer")

MAX_BODY: Final = wire.MAX_TENSOR + wire.MAX_HEAD + 4
ROLES: Final = ("stage", "group")


class Peer:
    """A model and the key that signs what it hands on."""

    def __init__(self, model: Path, role: str, identity: Identity, threads: int) -> None:
        self.role = role
        self.identity = identity
        self.session = runtime.session(model, threads=threads)
        first = self.session.get_inputs()[0]
        self.input = first.name
        self.shape = [d if isinstance(d, int) else None for d in first.shape]
        self.http: aiohttp.ClientSession | None = None

    def _run(self, x: np.ndarray) -> np.ndarray:
        if x.dtype == np.uint8:  # the image travels as pixels; the model takes pixel / 255
            x = x.astype(np.float32) / 255
        return np.asarray(self.session.run(None, {self.input: x})[0])

    def _checked(self, body: bytes) -> tuple[dict[str, Any], np.ndarray, float]:
        """Decode and verify a body; returns its head, tensor and seconds left."""
        head, tensor = wire.decode(body)
        if tensor.ndim != len(self.shape) or any(
            want is not None and got != want
            for got, want in zip(tensor.shape, self.shape, strict=True)
        ):
            raise wire.BaselineWireError(
                f"tensor of shape {list(tensor.shape)}; this model takes {self.shape}"
            )
        wire.check_head(head)
        chain = head["chain"]
        hop = head.get("hop", 0)
        image = head.get("image")
        if not isinstance(hop, int) or hop < 0 or (self.role == "stage" and hop >= len(chain)):
            raise wire.BaselineWireError(f"hop {hop!r} outside a chain of {len(chain)}")
        # The requester signed the image; a later stage checks that signature against
        # the image's hash it carries, and the previous stage's over the activation.
        first = self.role == "group" or hop == 0
        digest = wire.digest(tensor) if first else image
        fields = wire.request_fields(head, str(digest))
        wire.check(str(head.get("requester")), head.get("sig"), "request", fields)
        if not first:
            hand = {"id": head["id"], "hop": hop, "tensor": wire.digest(tensor)}
            wire.check(str(chain[hop - 1]["key"]), head.get("hand_sig"), "hand", hand)
        left = (int(head.get("deadline_ms", 0)) - wire.unix_ms()) / 1000
        return head, tensor, left

    async def _ran(
        self, request: web.Request, what: str
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray] | web.Response:
        """The checked request's head, input and this device's output; or the error."""
        try:
            head, tensor, left = self._checked(await request.read())
        except wire.BaselineWireError as exc:
            status = 403 if "signature" in str(exc) else 400
            return _error(status, str(exc))
        if left <= 0:
            return _error(504, f"deadline passed before this {what} ran")
        return head, tensor, self._run(tensor)

    def _reply(self, head: dict[str, Any], out: np.ndarray) -> web.Response:
        fields = {"id": head["id"], "probs": wire.digest(out)}
        reply = {"id": head["id"], "sig": wire.sign(self.identity, "reply", fields)}
        return web.Response(body=wire.encode(reply, out))

    async def stage(self, request: web.Request) -> web.Response:
        ran = await self._ran(request, "stage")
        if isinstance(ran, web.Response):
            return ran
        head, tensor, out = ran
        hop, chain = head["hop"], head["chain"]
        if hop == len(chain) - 1:
            return self._reply(head, out)
        nxt = {
            **head,
            "hop": hop + 1,
            "image": head.get("image") or wire.digest(tensor),
            "hand_sig": wire.sign(
                self.identity,
                "hand",
                {"id": head["id"], "hop": hop + 1, "tensor": wire.digest(out)},
            ),
        }
        nxt.pop("dtype", None)
        nxt.pop("shape", None)
        url = str(chain[hop + 1]["url"])
        assert self.http is not None
        try:
            async with asyncio.timeout(
                max(0.0, (int(head["deadline_ms"]) - wire.unix_ms()) / 1000)
            ):
                async with self.http.post(url, data=wire.encode(nxt, out)) as resp:
                    body = await resp.read()
                    return web.Response(status=resp.status, body=body)
        except TimeoutError:
            return _error(504, f"stage {hop + 2} did not answer within the deadline")
        except aiohttp.ClientError as exc:
            return _error(502, f"stage {hop + 2} unreachable: {type(exc).__name__}")

    async def group(self, request: web.Request) -> web.Response:
        ran = await self._ran(request, "sub-model")
        if isinstance(ran, web.Response):
            return ran
        head, _, out = ran
        return self._reply(head, out)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def serve(args: argparse.Namespace) -> None:
    identity = Identity.load_or_create(args.data_dir)
    peer = Peer(args.model, args.role, identity, args.threads)
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(
        "/v1/stage" if args.role == "stage" else "/v1/group",
        peer.stage if args.role == "stage" else peer.group,
    )
    app.router.add_get("/healthz", _health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, args.interface, args.port)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            peer.http = http
            ready = {
                "event": "ready",
                "peer_id": identity.peer_id,
                "public_key": identity.public_key_b64,
                "port": port,
                "role": args.role,
                "model": args.model.name,
                "pid": os.getpid(),
            }
            sys.stdout.write(json.dumps(ready) + "\n")
            sys.stdout.flush()
            log.info("baseline_peer_ready", role=args.role, port=port, model=args.model.name)
            await stop.wait()
    finally:
        await runner.cleanup()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sim.baselines.peer", description=__doc__.split("\n")[0]
    )
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--model", type=Path, required=True, help="the stage's or sub-model's ONNX")
    p.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--data-dir", type=Path, required=True, help="where its key lives")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    p.add_argument("--log-level", default="warning")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    if not args.model.is_file():
        sys.stderr.write(f"python -m sim.baselines.peer: error: no model file {args.model}\n")
        return 2
    if not 0 <= args.port <= 65535 or args.threads < 1:
        sys.stderr.write("python -m sim.baselines.peer: error: --port 0..65535, --threads >= 1\n")
        return 2
    aio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
