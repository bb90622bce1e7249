"""The requester's exchanges over aiohttp's client, as they were before
``swarm.requester.httpclient``: kept only so ``sim.bench`` can put them back and measure the
difference in the same run."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from swarm.crypto.session import MAC_HEADER
from swarm.errors import MessageTooLargeError
from swarm.requester import requester as requester_module
from swarm.requester.httpclient import ConnectFailed
from swarm.requester.requester import Requester

_CHUNK = 8192


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    limit_s: float,
    max_reply: int,
    headers: dict[str, str] | None,
) -> Any:
    """One POST over aiohttp's client, answered as the requester's ``_Response``."""
    try:
        async with asyncio.timeout(limit_s), session.post(url, data=body, headers=headers) as resp:
            if resp.content_length is not None and resp.content_length > max_reply:
                raise MessageTooLargeError(f"reply is {resp.content_length} bytes")
            raw = bytearray()
            async for chunk in resp.content.iter_chunked(_CHUNK):
                raw += chunk
                if len(raw) > max_reply:
                    raise MessageTooLargeError(f"reply exceeds the limit of {max_reply} bytes")
            return requester_module._Response(resp.status, bytes(raw), resp.headers.get(MAC_HEADER))
    except aiohttp.ClientConnectorError as exc:
        raise ConnectFailed(str(exc)) from exc


async def aiohttp_post(
    self: Requester,
    address: str,
    port: int,
    path: str,
    body: bytes,
    limit_s: float,
    max_reply: int,
    headers: dict[str, str] | None,
) -> Any:
    """``Requester._post`` before: the exchange over aiohttp's client session."""
    session = self._open_session()
    return await post(session, f"http://{address}:{port}{path}", body, limit_s, max_reply, headers)
