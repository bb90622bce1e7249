"""Talking to a sim agent's control socket (``sim.agent``): read or change its faults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import aiohttp

CONTROL_TIMEOUT_S: Final = 5.0


async def _call(
    socket: Path,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    connector = aiohttp.UnixConnector(path=str(socket))
    timeout = aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.request(method, f"http://agent{path}", json=body) as resp,
    ):
        data: dict[str, Any] = await resp.json()
        if resp.status != 200:
            raise ValueError(f"agent {socket}: {data.get('error', resp.status)}")
        return data


async def set_mode(socket: Path, **changes: Any) -> dict[str, Any]:
    """Change an agent's attack, target, slowdown or delay_ms; returns its new state."""
    return await _call(socket, "POST", "/mode", changes)


async def get_state(socket: Path) -> dict[str, Any]:
    return await _call(socket, "GET", "/state")
