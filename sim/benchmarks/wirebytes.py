"""Bytes on the wire per classify call, counted by the kernel at the requester's sockets.

``python sim/benchmarks/wirebytes.py [--swarm NAME] [--calls N]`` runs one requester of
the code on ``PYTHONPATH`` (this tree, or an older checkout of the project: it uses only
what both have, ``sim.benchmarks.fleet`` and ``sim.benchmarks.measure``). With
``--swarm`` it joins that swarm's five peers (mDNS on 127.0.0.1); without, it starts five
peers of its own (V1-V5) and stops them at the end. After warm-up calls (links and
sessions open, caches warm) it reads the kernel's counters of its own established TCP
sockets to the peers' ports (``ss -tinp``: ``bytes_sent`` and ``bytes_received`` of each
socket, TCP payload both ways), makes ``--calls`` classify calls one at a time, and reads
them again. Its last stdout line is a JSON object: the bytes per call both ways and the
sockets opened or closed meanwhile (a socket closed in the window takes its bytes with it,
so a run that closed one says so).

Run as a file rather than a module, so that the checkout measured is the one on
``PYTHONPATH`` and the counting is this file's, the same for every checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Final

VARIANTS: Final = ("V1", "V2", "V3", "V4", "V5")
WARM_CALLS: Final = 20
SS_TIMEOUT_S: Final = 10.0
# Starting five peers and mDNS on two busy cores, then the calls: well within this.
RUN_TIMEOUT_S: Final = 300.0
# This checkout's root: the tree measured when no other is named.
HERE: Final = Path(__file__).resolve().parents[2]
SCRIPT: Final = Path(__file__).resolve()
_PEER_ADDRESS: Final = re.compile(r"^127\.0\.0\.1:(\d+)$")
_COUNTER: Final = re.compile(r"\b(bytes_sent|bytes_received):(\d+)")


class CountError(RuntimeError):
    """The bytes could not be counted; the message says why."""


# (local address, peer address) -> (bytes sent, bytes received)
Counters = dict[tuple[str, str], tuple[int, int]]


def parse_ss(text: str, pid: int, ports: Collection[int]) -> Counters:
    """The counters of ``pid``'s sockets to 127.0.0.1 on ``ports`` in ``ss -tinpH`` output
    (each socket a line of addresses and owner, then an indented line of TCP info)."""
    out: Counters = {}
    key: tuple[str, str] | None = None
    owner = f"pid={pid},"
    for line in text.splitlines():
        if line and not line[0].isspace():
            fields = line.split()
            key = None
            if len(fields) >= 5 and owner in line:
                match = _PEER_ADDRESS.match(fields[3])
                if match is not None and int(match.group(1)) in ports:
                    key = (fields[2], fields[3])
                    out[key] = (0, 0)
        elif key is not None:
            counts = dict(_COUNTER.findall(line))
            out[key] = (int(counts.get("bytes_sent", 0)), int(counts.get("bytes_received", 0)))
            key = None
    return out


def socket_bytes(pid: int, ports: Collection[int]) -> Counters:
    """The kernel's byte counters of ``pid``'s established TCP sockets to ``ports``."""
    proc = subprocess.run(
        ["ss", "-tinpH", "state", "established"],
        capture_output=True,
        text=True,
        timeout=SS_TIMEOUT_S,
        check=True,
    )
    return parse_ss(proc.stdout, pid, ports)


def difference(before: Counters, after: Counters, calls: int) -> dict[str, Any]:
    """What ``calls`` calls moved between two readings: sockets in both count their
    growth, sockets opened meanwhile all they moved; sockets closed meanwhile are lost."""
    sent = received = 0
    for key, (s, r) in after.items():
        s0, r0 = before.get(key, (0, 0))
        sent += s - s0
        received += r - r0
    per = max(1, calls)
    return {
        "calls": calls,
        "bytes_sent": sent,
        "bytes_received": received,
        "bytes_per_call": round((sent + received) / per, 1),
        "sent_per_call": round(sent / per, 1),
        "received_per_call": round(received / per, 1),
        "sockets": len(after),
        "opened_during": len(after.keys() - before.keys()),
        "closed_during": len(before.keys() - after.keys()),
    }


async def measure(swarm: str | None, calls: int, workdir: Path) -> dict[str, Any]:
    """Warm up, then count the bytes of ``calls`` calls (see the module)."""
    fleet_mod = importlib.import_module("sim.benchmarks.fleet")
    measure_mod = importlib.import_module("sim.benchmarks.measure")
    try:
        inference = importlib.import_module("swarm.inference.manifest")
    except ImportError:  # a checkout before swarm/ had subpackages
        inference = importlib.import_module("swarm.inference")
    manifest = inference.load_manifest(inference.default_manifest_path())
    tensors = measure_mod.inputs(64)
    async with fleet_mod.Fleet(workdir) as fleet:
        if swarm is None:
            await fleet.start(VARIANTS)
            swarm = fleet.swarm
        async with fleet_mod.requester_of(swarm, manifest, peers=len(VARIANTS)) as req:
            await measure_mod.classify_loop(req, tensors, count=WARM_CALLS)
            ports = {record.port for record in req.table.candidates()}
            before = socket_bytes(os.getpid(), ports)
            loop = await measure_mod.classify_loop(req, tensors, count=calls)
            after = socket_bytes(os.getpid(), ports)
    return {**difference(before, after, calls), "failures": loop.failures, "peers": len(ports)}


async def count(
    *, tree: Path | None = None, swarm: str | None = None, calls: int
) -> dict[str, Any]:
    """Run this file as a process on the code of ``tree`` (an absolute path; this
    checkout's by default), joining ``swarm`` or starting its own peers; its result.
    ``CountError`` says why none came."""
    root = HERE if tree is None else tree
    args = [sys.executable, str(SCRIPT), "--calls", str(calls)]
    if swarm is not None:
        args += ["--swarm", swarm]
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=root,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CountError(f"counting bytes on {root} took over {RUN_TIMEOUT_S:g} s") from None
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = err.decode(errors="replace")[-1500:]
        raise CountError(f"counting bytes on {root} failed ({proc.returncode}): {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return {**result, "tree": str(root)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wirebytes.py", description=__doc__)
    parser.add_argument("--swarm", help="join this swarm's peers instead of starting five")
    parser.add_argument("--calls", type=int, default=200, help="classify calls counted")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be >= 1, got {args.calls}")
    log = importlib.import_module("swarm.log")
    log.configure_logging("json", "warning", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="vswarm-wirebytes-") as tmp:
        result = asyncio.run(measure(args.swarm, args.calls, Path(tmp)))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    # Run as a file, this directory heads sys.path; the checkout measured is PYTHONPATH's.
    sys.path.pop(0)
    sys.exit(main())
