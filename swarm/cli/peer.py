"""``python -m swarm.peer``: one device of the swarm, serving one variant.

The composition root. Startup, in order: logging, identity, trust, manifest, variant
choice (``--variant auto`` browses and measures first), the ONNX engine, reputation,
the requester (which serves this peer's own variant in-process), the HTTP server on each
``--interface``, and the mDNS announcement. When ready it prints one JSON line on stdout,
``{"event": "ready", "peer_id": ..., "port": ..., "variant": ...}``, so scripts and tests
know when to proceed.

SIGINT or SIGTERM: stop accepting HTTP, say goodbye on mDNS, close the requester, save the
reputation book, close the rest, exit 0. A startup error (bad flag, unknown variant,
missing manifest, port in use, bad trust file, unwritable data dir) is one line on stderr
and exit status 2.
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
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

from swarm import PROTOCOL_VERSION, aio, config
from swarm.cli import args as cliargs
from swarm.crypto.identity import Identity, TrustStore
from swarm.decision.reputation import ReputationBook
from swarm.discovery.mdns import ALL_INTERFACES, Discovery
from swarm.discovery.table import Announcement, PeerTable
from swarm.errors import ConfigError, SwarmError
from swarm.http.api import ServerContext, create_app
from swarm.http.listener import HttpServer
from swarm.http.view import PageSources
from swarm.inference import autoselect
from swarm.inference.engine import Engine
from swarm.inference.manifest import Manifest, ModelSpec, load_manifest
from swarm.link.answer import Answerer
from swarm.link.websocket import LinkServer
from swarm.log import bind_peer, configure_logging, get_logger
from swarm.metrics import Metrics
from swarm.requester.events import DecisionFeed, RecordedClassifier
from swarm.requester.requester import LocalInfer, Requester

log = get_logger("swarm.peer")  # not "__main__" when run with -m

PROG: Final = "python -m swarm.peer"
AUTO: Final = "auto"
REPUTATION_FILE: Final = "reputation.json"
EXIT_STARTUP: Final = 2
ANY_ADDRESS: Final = "0.0.0.0"  # a real device listens on all its interfaces


def default_data_dir() -> Path:
    """``$XDG_STATE_HOME/vswarm``, or ``~/.local/state/vswarm``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "vswarm"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts and the simulator grep for it.
        self.exit(EXIT_STARTUP, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port in 0..65535")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The command line of a peer."""
    p = _Parser(prog=PROG, description="Run one peer of a vswarm inference swarm.")
    p.add_argument(
        "--variant",
        required=True,
        help="the manifest variant this peer serves, or 'auto' to pick the one that adds "
        "the most to the swarm (uncovered first, then the best within --latency-budget-ms)",
    )
    p.add_argument(
        "--interface",
        action="append",
        type=cliargs.ipv4,
        metavar="IP",
        help="IPv4 address to announce, browse and listen on (repeatable); default: every "
        "interface of this device. Tests and simulations must pass one, e.g. 127.0.0.1",
    )
    p.add_argument("--port", type=_port, default=0, help="HTTP port (default 0: any free port)")
    p.add_argument(
        "--swarm",
        type=cliargs.swarm_name,
        default=config.DEFAULT_SWARM,
        help="swarm name; peers of other swarms are invisible (default %(default)s)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where this peer keeps its key and reputation state (default "
        "$XDG_STATE_HOME/vswarm or ~/.local/state/vswarm)",
    )
    p.add_argument(
        "--trust",
        type=Path,
        default=None,
        metavar="FILE",
        help="allow-list of public keys (one base64 key per line); without it any key "
        "learned from discovery is accepted",
    )
    p.add_argument(
        "--family",
        "--manifest",
        dest="manifest",
        type=Path,
        default=None,
        metavar="DIR",
        help="the family to serve: its folder (manifest.json and models) or its manifest.json "
        "(default: the shipped Fashion-MNIST family); its files' hashes are checked at start",
    )
    p.add_argument(
        "--threads", type=cliargs.int_in(1), default=1, help="ONNX Runtime threads (default 1)"
    )
    p.add_argument(
        "--latency-budget-ms",
        type=cliargs.number(0, above=True),
        default=None,
        help="with --variant auto: only variants this device runs within this many ms",
    )
    p.add_argument(
        "--browse-s",
        type=cliargs.number(0, autoselect.MAX_BROWSE_S, what="a number of seconds"),
        default=autoselect.DEFAULT_BROWSE_S,
        help="with --variant auto: how long to look at the swarm before choosing "
        "(default %(default)s)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=cliargs.number(0),
        default=None,
        help="micro-batching: how long a lone input waits for others to join its batch "
        f"(default {config.DEFAULT_TIMINGS.batch_wait_s * 1000:g}: inputs that queue up "
        "while a batch runs form the next one)",
    )
    p.add_argument(
        "--inline-max-ms",
        type=cliargs.number(0),
        default=None,
        help="run a batch on the event loop when the model takes at most this long for "
        f"it (default {config.DEFAULT_TIMINGS.inline_max_s * 1000:g}; measured at start), "
        "in the model's thread otherwise; 0: always in the thread",
    )
    p.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        help="run every input alone (for comparison; batching is on by default)",
    )
    p.add_argument(
        "--ui",
        choices=("on", "off"),
        default="on",
        help="on: serve the live page of this peer and its swarm at GET / (default); off: "
        "no page (404)",
    )
    p.add_argument("--log-format", choices=("json", "console"), default="console")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return p


def _serving_spec(manifest: Manifest, name: str) -> ModelSpec:
    for spec in manifest.variants:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in manifest.variants) or "none"
    raise ConfigError(
        f"unknown variant {name!r}; the manifest {manifest.path} has: {known}, or use 'auto'"
    )


def _check_writable(directory: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(
            f"the data directory {directory} is not writable ({exc.strerror}); "
            "pass a --data-dir this user can write"
        ) from exc


def _save_reputation(book: ReputationBook, path: Path) -> None:
    try:
        book.save(path)
    except ConfigError as exc:
        log.warning("reputation_save_failed", error=str(exc))
        return
    log.info("reputation_saved", path=str(path), peers=len(book))


class _Lifecycle:
    """Turns SIGINT/SIGTERM into a stop: cancels startup, or ends serving."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.ready = False
        self._task = asyncio.current_task()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("peer_stopping", signal=sig.name)
        self.stop.set()
        if not self.ready and self._task is not None:
            self._task.cancel()  # startup unwinds through the exit stack


def _print_ready(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def run_peer(
    args: argparse.Namespace, *, on_ready: Callable[[dict[str, Any]], None] = _print_ready
) -> None:
    """Start the peer, serve until SIGINT/SIGTERM, shut down cleanly."""
    life = _Lifecycle()
    life.install()
    try:
        await _serve(args, life, on_ready)
    finally:
        life.uninstall()


def serving_announcement(
    swarm: str, identity: Identity, spec: ModelSpec, port: int, family: str
) -> Announcement:
    """What a peer serving ``spec`` of ``family`` on ``port`` says about itself on mDNS."""
    return Announcement(
        swarm=swarm,
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        role="peer",
        port=port,
        variant=spec.name,
        model_sha256=spec.sha256,
        macs=spec.macs,
        accuracy=spec.val_accuracy,
        family=family,
    )


async def _serve(
    args: argparse.Namespace, life: _Lifecycle, on_ready: Callable[[dict[str, Any]], None]
) -> None:
    timings = config.DEFAULT_TIMINGS
    if args.batch_wait_ms is not None:
        timings = dataclasses.replace(timings, batch_wait_s=args.batch_wait_ms / 1000)
    if args.inline_max_ms is not None:
        timings = dataclasses.replace(timings, inline_max_s=args.inline_max_ms / 1000)
    data_dir: Path = args.data_dir if args.data_dir is not None else default_data_dir()
    identity = Identity.load_or_create(data_dir)
    bind_peer(identity.peer_id)
    _check_writable(data_dir)
    trust = TrustStore.from_file(args.trust) if args.trust is not None else TrustStore.open()
    manifest = load_manifest(args.manifest, verify=True)
    spec = None if args.variant == AUTO else _serving_spec(manifest, args.variant)
    interfaces: list[str] | None = args.interface
    metrics = Metrics()
    table = PeerTable(args.swarm, timings=timings)

    async with contextlib.AsyncExitStack() as stack:
        discovery = await stack.enter_async_context(
            Discovery(
                table,
                interfaces=interfaces if interfaces else ALL_INTERFACES,
                timings=timings,
            )
        )
        if spec is None:
            choice = await autoselect.auto_select(
                manifest,
                table,
                threads=args.threads,
                latency_budget_ms=args.latency_budget_ms,
                browse_s=args.browse_s,
                timings=timings,
            )
            spec = manifest.get(choice.name)
        engine = await stack.enter_async_context(
            Engine(
                spec,
                threads=args.threads,
                timings=timings,
                batching=args.batching,
                metrics=metrics,
                input_shape=manifest.input.shape,
                num_classes=manifest.num_classes,
            )
        )
        reputation_path = data_dir / REPUTATION_FILE
        reputation = ReputationBook.load(
            reputation_path, half_life_s=timings.reputation_half_life_s
        )
        stack.callback(_save_reputation, reputation, reputation_path)
        requester = await stack.enter_async_context(
            Requester(
                identity=identity,
                swarm=args.swarm,
                table=table,
                manifest=manifest,
                trust=trust,
                reputation=reputation,
                timings=timings,
                metrics=metrics,
                local=LocalInfer(engine),
            )
        )
        answerer = Answerer(
            identity,
            engine,
            swarm=args.swarm,
            family=manifest.family_id,
            input_shape=manifest.input.shape,
        )
        links = LinkServer.build(identity, answerer, trust=trust, timings=timings, metrics=metrics)
        page = None
        if args.ui == "on":  # the page's feed records every call of this requester
            feed = DecisionFeed()
            page = PageSources(
                peer_id=identity.peer_id,
                public_key=identity.public_key_b64,
                swarm=args.swarm,
                manifest=manifest,
                spec=spec,
                table=table,
                reputation=reputation,
                metrics=metrics,
                feed=feed,
                latency_ms=requester.latency_ms,
            )
        ctx = ServerContext(
            identity=identity,
            swarm=args.swarm,
            links=links,
            model=engine,
            manifest=manifest,
            table=table,
            metrics=metrics,
            classifier=requester if page is None else RecordedClassifier(requester, page.feed),
            timings=timings,
            page=page,
        )
        http = await stack.enter_async_context(
            HttpServer(
                create_app(ctx),
                hosts=interfaces or [ANY_ADDRESS],
                port=args.port,
                timings=timings,
            )
        )
        await discovery.register(
            serving_announcement(args.swarm, identity, spec, http.port, manifest.family_id)
        )
        aio.serving_gc()  # after startup: what it built is kept for the peer's life
        life.ready = True
        on_ready(
            {
                "event": "ready",
                "peer_id": identity.peer_id,
                "public_key": identity.public_key_b64,
                "port": http.port,
                "variant": spec.name,
                "model_sha256": spec.sha256,
                "swarm": args.swarm,
                "interfaces": interfaces or ["all"],
                "protocol": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "ui": page is not None,
            }
        )
        log.info("peer_ready", variant=spec.name, port=http.port, swarm=args.swarm)
        await life.stop.wait()
        # The order a leaving peer owes the others: refuse new work, then say goodbye;
        # the exit stack then closes the requester, saves reputation, closes the rest.
        await http.aclose()
        await discovery.unregister()
    log.info("peer_stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_format, args.log_level)
    except ConfigError as exc:
        return _startup_error(exc)
    ready: list[bool] = []

    def on_ready(event: dict[str, Any]) -> None:
        ready.append(True)
        _print_ready(event)

    try:
        aio.run(run_peer(args, on_ready=on_ready))
    except asyncio.CancelledError:
        return 0  # a signal during startup: everything opened so far was closed
    except SwarmError as exc:
        if not ready:
            return _startup_error(exc)
        log.exception("peer_failed", error=str(exc))
        return 1
    return 0


def _startup_error(exc: Exception) -> int:
    sys.stderr.write(f"{PROG}: error: {exc}\n")
    sys.stderr.flush()
    return EXIT_STARTUP


if __name__ == "__main__":
    sys.exit(main())
