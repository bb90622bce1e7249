"""The shape every long-lived resource of the runtime shares.

Discovery, the inference engine, the HTTP listener and the requester are each an async
context manager: entering starts it, leaving closes it, and ``aclose()`` is idempotent so
cleanup paths (signal handlers, ``AsyncExitStack``, ``finally``) may call it again.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncResource:
    """Mixin: ``async with`` calls ``start()`` then ``aclose()``; subclasses define both."""

    async def start(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
