"""``python -m swarm.classify IMAGE...``: classify images with the swarm, from any machine.

It joins the swarm as a requester: it browses mDNS for the swarm's peers and does not
announce itself (a requester serves nothing; registering would add the seconds of
RFC 6762 probing to every run and publish a port nobody listens on). It waits up to
``--wait`` seconds until ``--wait-peers`` variants are served (by default every variant
asked), then classifies each image in turn, with a table on stdout (the last column
names the peers whose top-1 dissented from the decision) or, with ``--json``, one JSON
object per image per line, in the order given: the decision, or for an image that got
none (unreadable, no peers, quorum not met, nothing valid before the deadline)
``{"image", "error", "rejected", "missing"}``, so a script never loses an image. Logs
go to stderr.

Exit status: 0 when every image was classified; 1 when some image got no decision or
could not be read, with one line per failure on stderr; 2 for a bad flag or setting, or
when no image can be read; 130 when interrupted.

Without ``--data-dir`` the requester uses a fresh key for this run and keeps no
reputation; with it, the key and the reputation book (``reputation.json``, the file a
peer keeps in its data directory) persist across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NoReturn, TextIO

from swarm import aio, config
from swarm.cli import args as cliargs
from swarm.config import DEFAULT_TIMINGS
from swarm.crypto.identity import Identity, TrustStore
from swarm.decision import voting
from swarm.decision.reputation import ReputationBook
from swarm.discovery.mdns import ALL_INTERFACES, Discovery
from swarm.discovery.table import PeerTable
from swarm.errors import (
    ConfigError,
    DecodeError,
    DiscoveryTimeoutError,
    NoDecisionError,
    SwarmError,
)
from swarm.inference.imaging import PixelArray, load_image_file
from swarm.inference.manifest import Manifest, load_manifest
from swarm.log import configure_logging, get_logger
from swarm.requester.call import ClassifyResult, Policy
from swarm.requester.requester import Requester
from swarm.wire import messages as wire

log = get_logger(__name__)

PROG: Final = "python -m swarm.classify"
REPUTATION_FILE: Final = "reputation.json"
DEFAULT_WAIT_S: Final = 5.0
EXIT_NO_DECISION: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
PEER_CHARS: Final = 8  # a peer id in the table: enough to tell the peers of a swarm apart


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts grep for it.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the requester."""
    p = _Parser(prog=PROG, description="Classify images with a vswarm inference swarm.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG, JPEG or .npy")
    p.add_argument(
        "--interface",
        action="append",
        type=cliargs.ipv4,
        metavar="IP",
        help="IPv4 address to browse mDNS on (repeatable); default: every interface of this "
        "device. Tests and simulations must pass one, e.g. 127.0.0.1",
    )
    p.add_argument(
        "--swarm",
        type=cliargs.swarm_name,
        default=config.DEFAULT_SWARM,
        help="swarm name (default %(default)s)",
    )
    p.add_argument(
        "--variants",
        default="all",
        metavar="all|NAME,...",
        help="variants to ask: 'all' (default) or a comma-separated list of manifest names",
    )
    p.add_argument(
        "--k",
        type=cliargs.int_in(1, config.MAX_TOP_K),
        default=config.DEFAULT_TOP_K,
        help="top-k classes each peer answers (default %(default)s)",
    )
    p.add_argument(
        "--rule",
        choices=voting.RULES,
        default=voting.DEFAULT_RULE,
        help="how the replies are combined (default %(default)s)",
    )
    p.add_argument(
        "--deadline-ms",
        type=cliargs.int_in(1, wire.MAX_DEADLINE_MS),
        default=round(DEFAULT_TIMINGS.deadline_s * 1000),
        help="time budget of one classification (default %(default)s)",
    )
    p.add_argument(
        "--quorum",
        type=cliargs.int_in(1, None),
        default=1,
        help="valid replies needed for a decision (default %(default)s)",
    )
    p.add_argument(
        "--max-macs",
        type=cliargs.int_in(0, None),
        default=None,
        help="total MACs budget of the peers",
    )
    p.add_argument(
        "--replicas",
        type=cliargs.replicas,
        default=1,
        metavar="N|all",
        help="ballots per variant: 1 (default) asks the best replica of each variant; "
        "'all' asks every peer, so the vote tolerates up to half of the peers lying",
    )
    p.add_argument(
        "--wave",
        type=cliargs.wave,
        default="auto",
        metavar="auto|N|all",
        help="ballots asked at once: 'all' asks every one; N asks N first (the "
        "cheapest models per unit of trust) and the others only if those leave the "
        "label open, which gives the same label (fewer peers "
        "disturbed, a second round trip for unclear inputs); 'auto' (default) asks all "
        f"while fewer than {config.WAVE_IN_FLIGHT} calls are in flight, a majority first "
        "from there on",
    )
    p.add_argument(
        "--latency-budget-ms",
        type=cliargs.number(0, above=True, what="a number of milliseconds"),
        default=None,
        help="skip peers whose measured latency exceeds this",
    )
    p.add_argument(
        "--wait",
        type=cliargs.number(0, what="a number of seconds"),
        default=DEFAULT_WAIT_S,
        metavar="S",
        help="seconds to wait for peers on mDNS (default %(default)s)",
    )
    p.add_argument(
        "--wait-peers",
        type=cliargs.int_in(1, None),
        default=None,
        metavar="N",
        help="stop waiting once N variants are served (default: every variant asked); "
        "after --wait, go on with what was found",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep this requester's key and reputation book here (default: a fresh key, "
        "nothing kept)",
    )
    p.add_argument(
        "--trust",
        type=Path,
        default=None,
        metavar="FILE",
        help="allow-list of peer public keys (one base64 key per line); default: any key",
    )
    p.add_argument(
        "--family",
        "--manifest",
        dest="manifest",
        type=Path,
        default=None,
        metavar="DIR",
        help="the family to ask: its folder (manifest.json and models) or its manifest.json "
        "(default: the shipped Fashion-MNIST family)",
    )
    p.add_argument("--log-format", choices=("json", "console"), default="console")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    return p


@dataclasses.dataclass(frozen=True, slots=True)
class _Setup:
    manifest: Manifest
    policy: Policy
    # (name, pixels) of each image, or (name, why it cannot be read), in the order given
    images: tuple[tuple[str, PixelArray | str], ...]
    identity: Identity
    trust: TrustStore
    reputation: ReputationBook
    reputation_path: Path | None
    wait_peers: int


def _prepare(args: argparse.Namespace) -> _Setup:
    """Everything that can be checked before touching the network; ConfigError if wrong."""
    manifest = load_manifest(args.manifest)
    if args.variants == "all":
        names = tuple(m.name for m in manifest.variants)
        chosen = None
    else:
        names = tuple(dict.fromkeys(n.strip() for n in args.variants.split(",") if n.strip()))
        if not names:
            raise ConfigError("--variants needs 'all' or a comma-separated list of names")
        for name in names:
            manifest.get(name)  # ConfigError naming the known models
        chosen = names
    policy = Policy(
        variants=chosen,
        max_macs=args.max_macs,
        latency_budget_ms=args.latency_budget_ms,
        replicas=args.replicas,
        wave=args.wave,
    )
    wait_peers = len(names) if args.wait_peers is None else args.wait_peers
    if wait_peers > len(names):
        raise ConfigError(f"--wait-peers {wait_peers} exceeds the {len(names)} variants asked")
    images = tuple((str(path), _read_image(path, manifest)) for path in args.images)
    trust = TrustStore.open() if args.trust is None else TrustStore.from_file(args.trust)
    if args.data_dir is None:
        identity, reputation, path = Identity.generate(), ReputationBook(), None
    else:
        identity = Identity.load_or_create(args.data_dir)
        path = args.data_dir / REPUTATION_FILE
        reputation = ReputationBook.load(path, half_life_s=DEFAULT_TIMINGS.reputation_half_life_s)
    return _Setup(manifest, policy, images, identity, trust, reputation, path, wait_peers)


def _read_image(path: Path, manifest: Manifest) -> PixelArray | str:
    """The family's input from ``path``, or why it cannot be read (a message for the user)."""
    try:
        return load_image_file(path, manifest.input.shape)
    except (ConfigError, DecodeError) as exc:
        message = str(exc)
        return message if str(path) in message else f"{path}: {message}"


async def _run(args: argparse.Namespace, setup: _Setup, out: TextIO) -> int:
    timings = DEFAULT_TIMINGS
    table = PeerTable(args.swarm, timings=timings)
    interfaces = args.interface or ALL_INTERFACES
    async with contextlib.AsyncExitStack() as stack:
        if setup.reputation_path is not None:
            stack.callback(_save_reputation, setup.reputation, setup.reputation_path)
        await stack.enter_async_context(Discovery(table, interfaces=interfaces, timings=timings))
        requester = await stack.enter_async_context(
            Requester(
                identity=setup.identity,
                swarm=args.swarm,
                table=table,
                manifest=setup.manifest,
                trust=setup.trust,
                reputation=setup.reputation,
                timings=timings,
            )
        )

        def enough(_: PeerTable) -> bool:
            return len(requester.available_variants(setup.policy)) >= setup.wait_peers

        printer = _Printer(
            out,
            json_lines=args.json,
            names=[n for n, _ in setup.images],
            classes=setup.manifest.class_names,
        )
        try:
            await table.wait_for(enough, timeout=args.wait)
        except DiscoveryTimeoutError:
            found = sorted(requester.available_variants(setup.policy))
            if not found:
                where = "all interfaces" if args.interface is None else ", ".join(args.interface)
                message = (
                    f"no peers found: no peer of swarm {args.swarm!r} serving the variants "
                    f"asked answered on mDNS ({where}) within {args.wait:g} s; "
                    f"{len(table.candidates())} other peer(s) seen"
                )
                for name, _ in setup.images:
                    printer.error(name, message)
                _fail(message)
                return EXIT_NO_DECISION
            log.warning("wait_peers_not_met", found=found, wanted=setup.wait_peers)
        status = 0
        for name, tensor in setup.images:
            if isinstance(tensor, str):
                printer.error(name, tensor)
                _fail(tensor)
                status = EXIT_NO_DECISION
                continue
            try:
                result = await requester.classify(
                    tensor,
                    rule=args.rule,
                    k=args.k,
                    policy=setup.policy,
                    deadline_ms=args.deadline_ms,
                    quorum=args.quorum,
                )
            except NoDecisionError as exc:
                printer.error(name, f"no decision: {exc}", exc.rejected, exc.missing)
                _fail(f"{name}: no decision: {exc}")
                status = EXIT_NO_DECISION
                continue
            printer.row(name, result)
    return status


class _Printer:
    """Results on stdout: an aligned table for people, or JSON lines for machines (an
    error line too for each image without a decision)."""

    # (title, width) of the right-aligned columns after IMAGE and CLASS.
    COLUMNS: Final = (
        ("CONF", 5),
        ("F", 2),
        ("LATENCY", 10),  # "1234.5 ms"
        ("REPLIES", 7),
        ("REJECTED", 8),
        ("MISSING", 7),
        ("SKIPPED", 7),
    )

    def __init__(
        self, out: TextIO, *, json_lines: bool, names: Sequence[str], classes: Sequence[str]
    ) -> None:
        self._out = out
        self._json = json_lines
        self._image_width = max(len("IMAGE"), *(len(n) for n in names))
        self._class_width = max(len("CLASS"), *(len(c) for c in classes))
        self._classes = tuple(classes)
        self._header_done = False

    def row(self, name: str, result: ClassifyResult) -> None:
        if self._json:
            self._out.write(json.dumps(result.to_json(image=name)) + "\n")
        else:
            if not self._header_done:
                self._line("IMAGE", "CLASS", [title for title, _ in self.COLUMNS])
                self._header_done = True
            counts = (result.replies, result.rejected, result.missing, result.skipped)
            self._line(
                name,
                result.class_name,
                [
                    f"{result.confidence:.3f}",
                    str(result.certified_f),
                    f"{result.latency_ms:.1f} ms",
                    *(str(len(c)) for c in counts),
                ],
                dissent=self._dissent(result),
            )
        self._out.flush()

    def error(
        self,
        name: str,
        message: str,
        rejected: Sequence[tuple[str, str]] = (),
        missing: Sequence[str] = (),
    ) -> None:
        """An image without a decision: a JSON line (the table leaves it to stderr)."""
        if not self._json:
            return
        doc: dict[str, Any] = {
            "image": name,
            "error": message,
            "rejected": [{"peer": peer, "reason": reason} for peer, reason in rejected],
            "missing": list(missing),
        }
        self._out.write(json.dumps(doc) + "\n")
        self._out.flush()

    def _line(self, image: str, label: str, cells: Sequence[str], dissent: str = "DISSENT") -> None:
        parts = [f"{image:<{self._image_width}}", f"{label:<{self._class_width}}"]
        parts += [f"{cell:>{width}}" for cell, (_, width) in zip(cells, self.COLUMNS, strict=True)]
        parts.append(dissent)
        self._out.write("  ".join(parts) + "\n")

    def _dissent(self, result: ClassifyResult) -> str:
        """The replies whose top-1 is not the decision, ``VARIANT:PEER=CLASS``; or ``-``."""
        out = []
        for reply in result.replies:
            top = voting.top_class(reply.topk)
            if top != result.label:
                name = self._classes[top] if 0 <= top < len(self._classes) else str(top)
                out.append(f"{reply.variant}:{reply.peer[:PEER_CHARS]}={name}")
        return ", ".join(out) or "-"


def _save_reputation(book: ReputationBook, path: Path) -> None:
    try:
        book.save(path)
    except ConfigError as exc:
        log.warning("reputation_save_failed", error=str(exc))


def _fail(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_format, args.log_level)
        setup = _prepare(args)
    except SwarmError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    if all(isinstance(tensor, str) for _, tensor in setup.images):
        # Nothing to classify: a usage error, reported image by image before any socket.
        printer = _Printer(
            sys.stdout,
            json_lines=args.json,
            names=[n for n, _ in setup.images],
            classes=setup.manifest.class_names,
        )
        for name, why in setup.images:
            printer.error(name, str(why))
            _fail(str(why))
        return EXIT_USAGE
    try:
        return aio.run(_run(args, setup, sys.stdout))
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except SwarmError as exc:
        _fail(str(exc))
        return EXIT_NO_DECISION


if __name__ == "__main__":
    sys.exit(main())
