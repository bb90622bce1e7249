"""``python -m sim.driver``: the simulator's requester, a process in a host of its own.

It joins the swarm like any requester (mDNS browsing on ``--interface``, links to the
peers) and takes JSON-line commands on stdin, answering JSON lines on stdout:

- ``{"cmd": "wait", "peers": N, "timeout_s": T}``: until its table holds N serving peers
  and each of them reports (``GET /v1/info``) seeing the other N - 1;
  answers ``{"event": "ready", "peers": [...]}``.
- ``{"cmd": "classify", "indices": [...], "rule", "deadline_ms", "variants", "interval_ms",
  "fresh_reputation"}``: each held-out test image through ``Requester.classify``, one
  ``{"event": "result", ...}`` line per image, then ``{"event": "done"}``.
- ``{"cmd": "gather", "indices": [...], "deadline_ms"}``: one request per image to
  *every* serving peer over the requester's links, every reply's signature and binding
  verified (``verify.verify_reply_batch``, ``verify.verify_reply``), then every voting rule
  applied to the same verified ballots (weights: the variant's validation accuracy); one
  ``{"event": "gather", ...}`` line per image.
- ``{"cmd": "quit"}``.

Times in results are unix seconds (``t``), comparable with the simulator's own clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import numpy as np
import numpy.typing as npt

from swarm import aio, config
from swarm.crypto.identity import Identity, TrustStore
from swarm.decision import voting
from swarm.decision.reputation import ReputationBook
from swarm.discovery.mdns import Discovery
from swarm.discovery.table import PeerRecord, PeerTable
from swarm.errors import DecodeError, DiscoveryTimeoutError, SwarmError, VerificationError
from swarm.inference.manifest import Manifest, load_manifest
from swarm.log import configure_logging, get_logger
from swarm.requester.call import Policy
from swarm.requester.requester import Requester
from swarm.wire import verify
from swarm.wire.messages import InferRequest, ItemError, ReplyBatch, build_request, unix_ms
from variants.data import load_split

log = get_logger("sim.driver")

HTTP_TIMEOUT_S: Final = 5.0
POLL_S: Final = 0.2  # between /v1/info rounds while waiting for a full mesh


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Driver:
    """A requester that the simulator steers, plus the gather-all path for rule studies."""

    def __init__(
        self,
        requester: Requester,
        table: PeerTable,
        manifest: Manifest,
        session: aiohttp.ClientSession,
    ) -> None:
        self.requester = requester
        self.table = table
        self.manifest = manifest
        self.session = session
        split = load_split("test")
        self.images: npt.NDArray[np.float32] = split.as_float()
        self.labels = split.labels

    async def wait(self, peers: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            await self.table.wait_for(peers, timeout=timeout_s)
        except DiscoveryTimeoutError as exc:
            raise DiscoveryTimeoutError(f"{exc}; this driver's table: {self._state()}") from None
        while True:
            records = [r for r in self.table.candidates() if r.role == "peer"]
            seen = await asyncio.gather(*(self._sees(r) for r in records))
            if len(records) >= peers and all(s >= peers - 1 for s in seen):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"peers did not find each other within {timeout_s} s: "
                    f"{len(records)} peers, each seeing {seen}; this driver's table: "
                    f"{self._state()}"
                )
            await asyncio.sleep(POLL_S)
        _emit(
            {
                "event": "ready",
                "peers": [
                    {
                        "peer_id": r.peer_id,
                        "variant": r.variant,
                        "addresses": list(r.addresses),
                        "port": r.port,
                    }
                    for r in records
                ],
            }
        )

    def _state(self) -> str:
        """Each peer of the table and why it is not a candidate, if it is not: what a
        failed wait reports, so that a slow recovery says which peer and why."""
        now = time.monotonic()
        parts = []
        for r in self.table.records():
            if r.role != "peer":
                continue
            if r.suspected:
                why = f"suspected after {r.failures} failures"
            elif r.suspected_until > now:
                why = f"backed off {r.suspected_until - now:.1f} s more ({r.failures} failures)"
            else:
                why = "candidate"
            parts.append(f"{r.peer_id[:8]} {r.variant} {why}")
        return "; ".join(parts) or "no peer"

    async def _sees(self, record: PeerRecord) -> int:
        url = f"http://{record.addresses[0]}:{record.port}/v1/info"
        try:
            async with self.session.get(url) as resp:
                info = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return -1
        return sum(1 for p in info.get("peers", []) if p.get("role") == "peer")

    async def classify(self, cmd: dict[str, Any]) -> None:
        rule = str(cmd.get("rule", voting.DEFAULT_RULE))
        deadline_ms = int(cmd.get("deadline_ms", 2000))
        variants = cmd.get("variants")
        replicas = cmd.get("replicas", 1)
        policy = Policy(
            variants=tuple(variants) if variants else None,
            replicas=None if replicas == "all" else int(replicas),
        )
        interval_s = float(cmd.get("interval_ms", 0)) / 1000
        if cmd.get("fresh_reputation"):
            self.requester.reputation = ReputationBook()
        for i in cmd["indices"]:
            started = time.monotonic()
            line: dict[str, Any] = {
                "event": "result",
                "i": i,
                "label": int(self.labels[i]),
                "t": time.time(),
            }
            try:
                res = await self.requester.classify(
                    self.images[i], rule=rule, policy=policy, deadline_ms=deadline_ms
                )
            except SwarmError as exc:
                line |= {"pred": None, "error": f"{type(exc).__name__}: {exc}"}
            else:
                line |= {
                    "pred": res.label,
                    "error": None,
                    "certified_f": res.certified_f,
                    "replies": [r.peer for r in res.replies],
                    "rejected": [[r.peer, r.reason] for r in res.rejected],
                    "missing": list(res.missing),
                    "skipped": list(res.skipped),
                }
            line["latency_ms"] = (time.monotonic() - started) * 1000
            _emit(line)
            if interval_s > 0:
                await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
        _emit({"event": "done"})

    async def gather(self, cmd: dict[str, Any]) -> None:
        deadline_ms = int(cmd.get("deadline_ms", 2000))
        for i in cmd["indices"]:
            started = time.monotonic()
            line = await self._gather_one(self.images[i], deadline_ms)
            line |= {
                "event": "gather",
                "i": i,
                "label": int(self.labels[i]),
                "latency_ms": (time.monotonic() - started) * 1000,
            }
            _emit(line)
        _emit({"event": "done"})

    async def _gather_one(self, x: npt.NDArray[np.float32], deadline_ms: int) -> dict[str, Any]:
        requester = self.requester
        request = build_request(
            swarm=self.table.swarm,
            family=requester.family,
            requester_id=requester.identity.peer_id,
            tensor=x,
            shape=requester.input_shape,
            deadline_ms=deadline_ms,
        )
        records = [r for r in self.table.records() if r.role == "peer"]
        ballots: list[voting.Ballot] = []
        rejected: list[list[str]] = []
        missing: list[str] = []
        # Each ask has the whole deadline: one hung peer costs its own reply only.
        batches = await asyncio.gather(
            *(asyncio.wait_for(self._ask(r, request), deadline_ms / 1000) for r in records),
            return_exceptions=True,
        )
        for record, got in zip(records, batches, strict=True):
            if isinstance(got, BaseException):
                if isinstance(got, DecodeError):
                    rejected.append([record.peer_id, "malformed"])
                else:
                    missing.append(record.peer_id)
                continue
            item = got.items[0]
            if isinstance(item, ItemError):
                missing.append(record.peer_id)
                continue
            try:
                verify.verify_reply_batch(got, expected_key=record.public_key)
                verify.verify_reply(
                    item,
                    request=request,
                    expected_peer_id=record.peer_id,
                    expected_key=record.public_key,
                    trust=requester.trust,
                    now_ms=unix_ms(),
                    freshness_s=requester.timings.freshness_s,
                    expected_variant=record.variant,
                    expected_model_sha256=record.model_sha256,
                )
            except VerificationError as exc:
                rejected.append([record.peer_id, exc.reason])
                continue
            weight = self.manifest.get(record.variant).val_accuracy
            ballots.append(
                voting.Ballot(record.peer_id, record.variant, item.topk_probabilities(), weight)
            )
        preds: dict[str, int | None] = {}
        for rule in voting.RULES:
            try:
                preds[rule] = voting.decide(
                    ballots, rule, num_classes=self.manifest.num_classes
                ).label
            except SwarmError:
                preds[rule] = None
        return {
            "preds": preds,
            "ballots": [b.peer_id for b in ballots],
            "rejected": rejected,
            "missing": missing,
        }

    async def _ask(self, record: PeerRecord, request: InferRequest) -> ReplyBatch:
        link = await self.requester.transport.link(record)
        return await link.exchange([request])


async def _commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run_driver(args: argparse.Namespace) -> None:
    timings = config.Timings(hedge_after_s=args.hedge_after_ms / 1000)
    identity = Identity.load_or_create(args.data_dir)
    manifest = load_manifest()
    table = PeerTable(args.swarm, timings=timings)
    http_timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    async with (
        Discovery(table, interfaces=[args.interface], timings=timings),
        Requester(
            identity=identity,
            swarm=args.swarm,
            table=table,
            manifest=manifest,
            trust=TrustStore.open(),
            reputation=ReputationBook(),
            timings=timings,
        ) as requester,
        aiohttp.ClientSession(timeout=http_timeout) as session,
    ):
        driver = Driver(requester, table, manifest, session)
        reader = await _commands()
        _emit({"event": "started", "peer_id": identity.peer_id})
        while line := await reader.readline():
            cmd = json.loads(line)
            try:
                match cmd.get("cmd"):
                    case "wait":
                        await driver.wait(int(cmd["peers"]), float(cmd.get("timeout_s", 30)))
                    case "classify":
                        await driver.classify(cmd)
                    case "gather":
                        await driver.gather(cmd)
                    case "quit":
                        break
                    case other:
                        _emit({"event": "error", "error": f"unknown command {other!r}"})
            except (SwarmError, TimeoutError, KeyError, ValueError) as exc:
                _emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim.driver", description=__doc__.split("\n")[0])
    p.add_argument("--interface", required=True)
    p.add_argument("--swarm", required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--hedge-after-ms", type=float, default=250.0)
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    p.add_argument("--log-level", default="warning")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    aio.run(run_driver(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
