"""``python -m sim.faults ACTION ...``: break a running simulated swarm by hand.

The simulator writes ``OUT/state.json`` (pids, namespaces, control sockets); every action
reads it (``--out OUT`` or ``--state FILE``). Peers are named as in the sim (p0, p1, ...)::

    python -m sim.faults --out runs/sim/crash-... status
    python -m sim.faults --out DIR kill p1            # SIGKILL: a crash
    python -m sim.faults --out DIR pause p2           # SIGSTOP: a hung device
    python -m sim.faults --out DIR resume p2          # SIGCONT
    python -m sim.faults --out DIR slow p0 --factor 4 --delay-ms 100   (sim agents only)
    python -m sim.faults --out DIR byzantine p0 collude [--target 3]   (sim agents only)
    python -m sim.faults --out DIR partition p0,p1,driver p2,p3,p4     (namespaces only)
    python -m sim.faults --out DIR heal
    python -m sim.faults cleanup                      # namespaces left by a crashed sim

``kill``, ``pause`` and ``resume`` also take ``--pid PID`` for any peer process of this
machine, inside a sim or not. Restarting is the simulator's job (it owns the processes).
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

from sim import control, netns
from sim.byzantine import MODES
from sim.procs import STATE_FILE

EXIT_ERROR: Final = 1
SIGNALS: Final = {"kill": signal.SIGKILL, "pause": signal.SIGSTOP, "resume": signal.SIGCONT}


class FaultError(RuntimeError):
    """The action cannot be done; the message says why."""


def load_state(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FaultError(f"cannot read the sim state {path}: {exc}") from exc
    if not state.get("running"):
        raise FaultError(f"the sim of {path} is not running any more")
    return state


def _proc(state: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        proc: dict[str, Any] = state["procs"][name]
    except KeyError:
        known = ", ".join(state["procs"])
        raise FaultError(f"no process {name!r} in this sim; it has: {known}") from None
    return proc


def _control(state: dict[str, Any], name: str) -> Path:
    sock = _proc(state, name).get("control")
    if not sock:
        raise FaultError(f"{name} is a real swarm.peer: only sim agents take slow/byzantine")
    return Path(sock)


def _lab(state: dict[str, Any]) -> netns.Lab:
    lab = state.get("lab")
    if not lab:
        raise FaultError("this sim runs on loopback: partitions need network namespaces")
    hosts = {n: netns.Host(**h) for n, h in lab["hosts"].items()}
    return netns.attach(lab["tag"], hosts)


async def act(args: argparse.Namespace) -> dict[str, Any]:  # noqa: PLR0911  # one per action
    if args.action == "cleanup":
        # Every lab's namespaces share the prefix: only when no sim or test is running.
        return {"deleted": netns.cleanup_stale()}
    if args.action in SIGNALS and args.pid is not None:
        os.kill(args.pid, SIGNALS[args.action])
        return {"pid": args.pid, "signal": SIGNALS[args.action].name}
    state = load_state(args.state or (args.out / STATE_FILE))
    match args.action:
        case "status":
            return {
                n: {k: p[k] for k in ("kind", "pid", "alive", "ip", "port", "variant")}
                for n, p in state["procs"].items()
            }
        case "kill" | "pause" | "resume":
            pid = _proc(state, args.name).get("pid")
            if pid is None:
                raise FaultError(f"{args.name} has no process")
            os.kill(int(pid), SIGNALS[args.action])
            return {"name": args.name, "pid": pid, "signal": SIGNALS[args.action].name}
        case "slow":
            return await control.set_mode(
                _control(state, args.name), slowdown=args.factor, delay_ms=args.delay_ms
            )
        case "byzantine":
            changes: dict[str, Any] = {"attack": args.attack}
            if args.target is not None:
                changes["target"] = args.target
            return await control.set_mode(_control(state, args.name), **changes)
        case "partition":
            groups = [g.split(",") for g in args.groups]
            _lab(state).partition(groups)
            return {"partition": groups}
        case "heal":
            _lab(state).heal()
            return {"healed": True}
    raise FaultError(f"unknown action {args.action!r}")  # pragma: no cover - argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sim.faults",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=Path("."), help="the sim's output folder")
    where.add_argument("--state", type=Path, default=None, help="the sim's state.json")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("status", help="the sim's processes")
    for name in SIGNALS:
        sp = sub.add_parser(name, help=f"send {SIGNALS[name].name}")
        sp.add_argument("name", nargs="?", default=None)
        sp.add_argument("--pid", type=int, default=None, help="any peer process, by pid")
    sp = sub.add_parser("slow", help="slow an agent down (a slower device)")
    sp.add_argument("name")
    sp.add_argument("--factor", type=float, default=1.0)
    sp.add_argument("--delay-ms", type=float, default=0.0)
    sp = sub.add_parser("byzantine", help="make an agent lie (or 'honest' again)")
    sp.add_argument("name")
    sp.add_argument("attack", choices=MODES)
    sp.add_argument("--target", type=int, default=None)
    sp = sub.add_parser("partition", help="split the bridge: groups of comma-separated names")
    sp.add_argument("groups", nargs="+")
    sub.add_parser("heal", help="every host back on one bridge")
    sub.add_parser(
        "cleanup",
        help="delete the namespaces left by crashed sims (every lab's: run it only when "
        "no sim or test is running)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action in SIGNALS and args.name is None and args.pid is None:
        parser.error(f"{args.action}: give a peer name or --pid")
    try:
        result = asyncio.run(act(args))
    except (FaultError, netns.NetnsError, ValueError, OSError) as exc:
        sys.stderr.write(f"python -m sim.faults: error: {exc}\n")
        return EXIT_ERROR
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
