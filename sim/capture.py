"""``python -m sim.capture --interface IF --out FILE``: one interface's frames as a pcap file.

For looking at what the swarm puts on the simulator's own network: run it inside the lab's
hub namespace on a host's bridge port (``ip netns exec HUB python -m sim.capture
--interface p3 ...``) and open the file in Wireshark, or search it. A raw packet socket,
so it needs root, as the lab does. It prints ``ready`` once listening and stops after
``--seconds``, ``--max-bytes`` or SIGTERM/SIGINT, whichever comes first.
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

_ETH_P_ALL: Final = 0x0003  # every protocol (linux/if_ether.h)
_SNAPLEN: Final = 65_535
# The classic pcap file header: magic, version 2.4, GMT offset, accuracy, snaplen, and the
# link type 1 (Ethernet).
_HEADER: Final = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, _SNAPLEN, 1)


def capture(interface: str, out: Path, *, seconds: float, max_bytes: int) -> int:
    """Record ``interface``'s frames into ``out``; the number of frames written."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    frames = written = 0
    try:
        sock.bind((interface, 0))
        sock.settimeout(0.1)
        deadline = time.monotonic() + seconds
        with out.open("wb") as f:
            f.write(_HEADER)
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            while not stopping and time.monotonic() < deadline and written < max_bytes:
                try:
                    data = sock.recv(_SNAPLEN)
                except TimeoutError:
                    continue
                now = time.time()
                f.write(struct.pack("<IIII", int(now), int(now % 1 * 1e6), len(data), len(data)))
                f.write(data)
                frames += 1
                written += len(data)
    finally:
        sock.close()
    return frames


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.capture", description=__doc__.split("\n")[0])
    p.add_argument("--interface", required=True, help="the interface to record, e.g. p3")
    p.add_argument("--out", type=Path, required=True, help="the pcap file to write")
    p.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    p.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024, help="stop past this")
    args = p.parse_args(argv)
    try:
        frames = capture(args.interface, args.out, seconds=args.seconds, max_bytes=args.max_bytes)
    except OSError as exc:
        sys.stderr.write(f"python -m sim.capture: error: {args.interface}: {exc}\n")
        return 1
    sys.stderr.write(f"{frames} frames written to {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
