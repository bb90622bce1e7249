"""Bytes on the wire, counted by the kernel at the sockets of the devices' ports.

``ss -tin`` reports, for every established TCP socket, the payload bytes it sent and
received (``tcp_info``: ``bytes_sent``, ``bytes_received``). A ``SocketMeter`` polls the
sockets whose local port is one of the devices' listening ports, for as long as a phase
runs, and keeps each connection's latest counters; its total is what crossed into and out
of the devices in that phase (TCP payload: HTTP heads and bodies, not the IP and TCP
headers). The same meter counts all three approaches, whatever their transport. A
connection that opens and closes between two polls is missed: the poll interval is short
and every transport here keeps its connections open.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import Iterable
from typing import Final

POLL_S: Final = 0.05
_SOCKET: Final = re.compile(r"^\S+\s+\S+\s+(\S+):(\d+)\s+(\S+):(\d+)")
_SENT: Final = re.compile(r"\bbytes_sent:(\d+)")
_RECEIVED: Final = re.compile(r"\bbytes_received:(\d+)")


class MeterError(RuntimeError):
    """The sockets cannot be counted here; the message says what is missing."""


Key = tuple[str, int, str, int]


def parse(text: str) -> dict[Key, tuple[int, int]]:
    """``ss -tinH`` output to {(local ip, port, peer ip, port): (sent, received)}."""
    out: dict[Key, tuple[int, int]] = {}
    key: Key | None = None
    for line in text.splitlines():
        head = _SOCKET.match(line)
        if head:
            key = (head.group(1), int(head.group(2)), head.group(3), int(head.group(4)))
            continue
        if key is None:
            continue
        sent = _SENT.search(line)
        received = _RECEIVED.search(line)
        out[key] = (int(sent.group(1)) if sent else 0, int(received.group(1)) if received else 0)
        key = None
    return out


class SocketMeter:
    """Counts the TCP payload through the given local ports while ``running``."""

    def __init__(self, ports: Iterable[int]) -> None:
        self.ports = sorted(set(ports))
        if not self.ports:
            raise MeterError("no ports to count")
        if shutil.which("ss") is None:
            raise MeterError("'ss' (iproute2) is not installed: apt-get install iproute2")
        self._base: dict[Key, tuple[int, int]] = {}
        self._last: dict[Key, tuple[int, int]] = {}
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> dict[Key, tuple[int, int]]:
        expr = " or ".join(f"sport = :{p}" for p in self.ports)
        proc = await asyncio.create_subprocess_exec(
            "ss",
            "-tinH",
            "state",
            "established",
            f"( {expr} )",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        raw, _ = await proc.communicate()
        return parse(raw.decode(errors="replace"))

    async def _poll(self) -> None:
        while True:
            self._last.update(await self.sample())
            await asyncio.sleep(POLL_S)

    async def start(self) -> None:
        self._base = await self.sample()
        self._last = dict(self._base)
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> tuple[int, int]:
        """Stop counting; returns (bytes into the devices, bytes out of them)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._last.update(await self.sample())
        into = out = 0
        for key, (sent, received) in self._last.items():
            base_sent, base_received = self._base.get(key, (0, 0))
            out += sent - base_sent
            into += received - base_received
        return into, out
