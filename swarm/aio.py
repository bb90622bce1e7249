"""The event loop every entry point runs on: uvloop where installed, else asyncio's; and
the garbage collector's settings for a process that serves.

uvloop (libuv under asyncio's API) takes less CPU per I/O event than the stock selector
loop, which is most of what a peer does per request (``sim.bench`` measures both). Set
``VSWARM_EVENT_LOOP=asyncio`` to run on the stock loop.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

from swarm.errors import ConfigError

_uvloop_factory: Callable[[], asyncio.AbstractEventLoop] | None
try:
    from uvloop import new_event_loop as _uvloop_factory
except ImportError:  # not installed (it is a dependency where it builds): the stock loop
    _uvloop_factory = None

ENV: Final = "VSWARM_EVENT_LOOP"
CHOICES: Final = ("uvloop", "asyncio")
# The cyclic collector's thresholds in a serving process (Python's are 700, 10, 10).
SERVING_GC_THRESHOLDS: Final = (50_000, 20, 20)

T = TypeVar("T")


def loop_name() -> str:
    """The loop ``run`` uses: ``uvloop`` unless the environment or the install says no."""
    wanted = os.environ.get(ENV, "").strip().lower() or "uvloop"
    if wanted not in CHOICES:
        raise ConfigError(f"{ENV} must be one of {', '.join(CHOICES)}, got {wanted[:40]!r}")
    if wanted == "uvloop" and _uvloop_factory is None:
        return "asyncio"
    return wanted


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``loop_name`` picks."""
    try:
        name = loop_name()
    except ConfigError:
        main.close()  # never awaited: close it, or Python warns about it
        raise
    factory = _uvloop_factory if name == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def serving_gc() -> None:
    """Set the cyclic garbage collector for a process that serves requests from now on.

    Every object alive now (modules, the model, what startup built) moves to a
    generation that collections no longer walk (``gc.freeze``). The first threshold
    goes from 700 to 50,000 new container objects: at Python's default, a requester with
    32 calls in flight ran a young collection about every ten calls, and each walked the
    objects of the calls still in flight, which then went on to the older generations
    and were walked again there (``sim.bench`` reports the requester's collector time
    per call). Objects freed by their reference counts, nearly all of a call's, are not
    affected; garbage in reference cycles waits for up to that many allocations.
    """
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)
