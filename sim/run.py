"""``python -m sim.run SCENARIO``: run a scenario on a simulated swarm and report.

SCENARIO is a built-in name (paper, byzantine, crash, straggler, partition, churn) or a
TOML file (schema: ``sim.scenario``); ``compare`` runs ``sim.runners.compare`` (options
of its own: ``python -m sim.run compare --help``). As root every peer and the driver get a
network namespace of their own on a private bridge; otherwise (or with ``--loopback``) all
run on 127.0.0.1. Every process and namespace is removed on exit, Ctrl-C or failure. Writes
``OUT/report.json``, ``OUT/report.md``, PNG plots, ``OUT/state.json`` (for
``python -m sim.faults``) and each process's log under ``OUT/logs/``. Exit status: 0 when
every target of the report is met, 1 when one is missed or the run failed, 2 for a bad
scenario, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from sim import netns, report
from sim.live import LiveRun, LiveServer
from sim.procs import Cluster, SimError
from sim.runners import byzantine, churn, compare, crash, paper, partition, straggler
from sim.runners.common import Report
from sim.scenario import BUILTIN, Scenario, ScenarioError, builtin, load
from swarm import aio
from swarm.log import configure_logging

log = structlog.get_logger("sim.run")

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

Runner = Callable[[Cluster, Scenario, Any], Awaitable[Report]]
RUNNERS: Final[dict[str, Runner]] = {
    "byzantine": byzantine.run,
    "crash": crash.run,
    "churn": churn.run,
    "straggler": straggler.run,
    "paper": paper.run,
    "partition": partition.run,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sim.run", description=__doc__.split("\n")[0])
    p.add_argument("scenario", help=f"one of {', '.join(BUILTIN)}, or a scenario .toml file")
    p.add_argument("--peers", type=int, default=None, help="number of peers (variants cycle)")
    p.add_argument("--images", type=int, default=None, help="held-out test images to drive")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--deadline-ms", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="default runs/sim/SCENARIO-TIME")
    p.add_argument(
        "--loopback", action="store_true", help="run everything on 127.0.0.1 even as root"
    )
    p.add_argument(
        "--serve",
        type=_port,
        default=None,
        metavar="PORT",
        help="show the run live at http://127.0.0.1:PORT/ (0: any free port), and keep the "
        "page up after the run, with its report, until Ctrl-C",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default="warning")
    return p


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port in 0..65535")
    return int(text)


def resolve(args: argparse.Namespace) -> Scenario:
    source = Path(args.scenario)
    scenario = load(source) if source.suffix == ".toml" else builtin(args.scenario)
    return scenario.with_options(
        peers=args.peers, images=args.images, seed=args.seed, deadline_ms=args.deadline_ms
    )


def use_namespaces(loopback: bool) -> bool:
    if loopback:
        return False
    ok, why = netns.available()
    if not ok:
        log.warning("sim_loopback", reason=why)
    return ok


async def run(
    scenario: Scenario,
    out: Path,
    *,
    use_netns: bool,
    progress: bool = True,
    live: LiveRun | None = None,
) -> Report:
    """Run ``scenario`` on a fresh cluster, always cleaning up; write the report (and tell
    ``live`` what happens, for its page)."""
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415  # the sim extra's; only with a progress bar

        bar = tqdm(total=scenario.images, desc=scenario.name, unit="req", file=sys.stderr)
    try:
        observer = None if live is None else live.observe
        async with Cluster(out, use_netns=use_netns, observer=observer) as cluster:
            if live is not None:
                live.cluster = cluster
            result = await RUNNERS[scenario.kind](cluster, scenario, bar)
    finally:
        if bar is not None:
            bar.close()
    result.extra.setdefault("network", "netns" if use_netns else "loopback")
    report.write(result, out)
    if live is not None:
        live.finish()
    return result


async def _main_async(scenario: Scenario, out: Path, args: argparse.Namespace) -> Report:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    use_netns = use_namespaces(args.loopback)
    if args.serve is None:
        return await run(scenario, out, use_netns=use_netns, progress=not args.no_progress)
    live = LiveRun(scenario.name, out)
    async with LiveServer(live, args.serve) as server:
        sys.stderr.write(f"live: {server.url}\n")
        sys.stderr.flush()
        result = await run(
            scenario, out, use_netns=use_netns, progress=not args.no_progress, live=live
        )
        sys.stderr.write(
            f"the run is over; its page stays at {server.url} (report: "
            f"{server.url}run/report.html) until Ctrl-C\n"
        )
        sys.stderr.flush()
        stop = asyncio.Event()  # from here a signal ends the page, not a run
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:  # its own options: three approaches, not one scenario
        return compare.main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging("console", args.log_level)
    try:
        scenario = resolve(args)
    except ScenarioError as exc:
        sys.stderr.write(f"python -m sim.run: error: {exc}\n")
        return EXIT_USAGE
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / "sim" / f"{scenario.name}-{stamp}-{os.getpid()}"
    try:
        result = aio.run(_main_async(scenario, out, args))
    except asyncio.CancelledError:
        sys.stderr.write("interrupted: every process and namespace was removed\n")
        return EXIT_INTERRUPTED
    except (SimError, netns.NetnsError, ValueError) as exc:
        sys.stderr.write(f"python -m sim.run: failed: {exc}\n")
        return EXIT_FAILED
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.json'}")
    return 0 if all(t["ok"] for t in result.targets) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
