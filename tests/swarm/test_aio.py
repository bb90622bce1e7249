"""The entry points' event loop and garbage collector settings (``swarm.aio``)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from swarm import aio
from swarm.errors import ConfigError


@pytest.fixture
def collector_restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector_restored")
def test_serving_gc_keeps_startup_objects_out_of_collections() -> None:
    built_at_start = [{"model": i} for i in range(100)]
    frozen = gc.get_freeze_count()
    aio.serving_gc()
    assert gc.get_threshold() == aio.SERVING_GC_THRESHOLDS
    assert gc.get_freeze_count() >= frozen + len(built_at_start)
    # What comes after startup is collected as before, cycles included.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


def test_an_unknown_event_loop_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aio.ENV, "tokio")
    with pytest.raises(ConfigError, match="VSWARM_EVENT_LOOP must be one of uvloop, asyncio"):
        aio.loop_name()

    async def main() -> int:
        return 1

    with pytest.raises(ConfigError):
        aio.run(main())  # closed, not left unawaited


def test_the_stock_loop_runs_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aio.ENV, "asyncio")

    async def main() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert aio.loop_name() == "asyncio"
    assert aio.run(main()).startswith("asyncio")
