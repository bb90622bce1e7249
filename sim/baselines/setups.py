"""The three approaches as swarms of real processes on one ``sim.procs.Cluster``.

- ``VariantSwarm``: ``python -m swarm.peer`` peers, one per variant, asked through
  ``python -m sim.driver`` processes (the swarm's own requester, its own transport);
- ``ChainSwarm``: model parallelism, one ``sim.baselines.peer --role stage`` per stage;
- ``GroupSwarm``: class parallelism (sensAI), one ``--role group`` peer per sub-model.

Each answers ``classify`` with one row per image (``pred`` None when nothing answered)
and says which classes its live devices can still answer.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import numpy as np

from sim.baselines import split
from sim.baselines.client import BaselineClient, Device, Outcome
from sim.procs import LOOPBACK, Cluster, Driver, Proc, SimError
from swarm.crypto.identity import Identity

MESH_TIMEOUT_S: Final = 90.0
ALL_CLASSES: Final = tuple(range(10))


class Swarm:
    """What the comparison needs of an approach's swarm."""

    approach = ""
    size = 0
    label = ""

    def __init__(self, cluster: Cluster, tag: str) -> None:
        self.cluster = cluster
        self.tag = tag
        self.names: list[str] = []
        self.dead: set[str] = set()

    def ports(self) -> list[int]:
        return [int(self.cluster.procs[n].ready["port"]) for n in self.names]

    async def kill(self, name: str) -> None:
        await self.cluster.kill(name)
        self.dead.add(name)

    async def stop(self) -> None:
        for name in self.names:
            await self.cluster.stop(name)

    def answerable(self) -> tuple[int, ...]:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def classify(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        indices: Sequence[int],
        concurrency: int,
        deadline_ms: int,
    ) -> list[dict[str, Any]]:
        raise NotImplementedError


class VariantSwarm(Swarm):
    approach = "variant"

    def __init__(self, cluster: Cluster, tag: str, variants: Sequence[str], drivers: int) -> None:
        super().__init__(cluster, tag)
        self.variants = list(variants)
        self.size = len(self.variants)
        self.label = f"variant n={self.size} ({','.join(self.variants)})"
        self.driver_count = drivers
        self.drivers: list[Driver] = []

    async def start(self) -> None:
        self.names = [f"{self.tag}-p{i}" for i in range(self.size)]
        await asyncio.gather(
            *(
                self.cluster.add_peer(n, v, threads=1)
                for n, v in zip(self.names, self.variants, strict=True)
            )
        )
        for i in range(self.driver_count):
            driver = await self.cluster.add_driver(f"{self.tag}-d{i}")
            await driver.wait_peers(self.size, MESH_TIMEOUT_S)
            self.drivers.append(driver)

    async def stop(self) -> None:
        for driver in self.drivers:
            await self.cluster.stop(driver.proc.name)
        await super().stop()

    def answerable(self) -> tuple[int, ...]:
        return ALL_CLASSES if len(self.dead) < self.size else ()

    async def classify(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        indices: Sequence[int],
        concurrency: int,
        deadline_ms: int,
    ) -> list[dict[str, Any]]:
        use = self.drivers[: max(1, min(concurrency, len(self.drivers)))]
        shares = [list(indices[i :: len(use)]) for i in range(len(use))]
        timeout = len(indices) * (deadline_ms / 1000 + 0.5) + 60
        runs = await asyncio.gather(
            *(
                d.run({"cmd": "classify", "indices": share, "deadline_ms": deadline_ms}, timeout)
                for d, share in zip(use, shares, strict=True)
                if share
            )
        )
        rows = []
        for events in runs:
            for e in events:
                if e.get("event") != "result":
                    continue
                rows.append(
                    {
                        "i": e["i"],
                        "label": e["label"],
                        "pred": e.get("pred"),
                        "latency_ms": float(e["latency_ms"]),
                        "error": e.get("error"),
                    }
                )
        return rows


class _BaselineSwarm(Swarm):
    """A swarm of ``sim.baselines.peer`` processes asked from this process."""

    role = ""

    def __init__(self, cluster: Cluster, tag: str, models: Sequence[Path]) -> None:
        super().__init__(cluster, tag)
        self.models = list(models)
        self.size = len(self.models)
        self.devices: list[Device] = []
        self.identity = Identity.generate()
        self.session: aiohttp.ClientSession | None = None

    async def _add(self, name: str, model: Path) -> Proc:
        data_dir = self.cluster.out / "data" / name
        argv = [
            sys.executable, "-m", "sim.baselines.peer",
            "--role", self.role,
            "--model", str(model),
            "--interface", LOOPBACK,
            "--port", "0",
            "--data-dir", str(data_dir),
            "--threads", "1",
        ]  # fmt: skip
        proc = Proc(
            name,
            "baseline",
            argv,
            LOOPBACK,
            None,
            data_dir,
            self.cluster.out / "logs" / f"{name}.log",
        )
        self.cluster.procs[name] = proc
        await self.cluster.start(proc)
        return proc

    async def start(self) -> None:
        self.names = [f"{self.tag}-p{i}" for i in range(self.size)]
        procs = await asyncio.gather(
            *(self._add(n, m) for n, m in zip(self.names, self.models, strict=True))
        )
        self.devices = [self._device(p, i) for i, p in enumerate(procs)]
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=None)
        )

    def _device(self, proc: Proc, index: int) -> Device:
        route = "stage" if self.role == "stage" else "group"
        return Device(
            proc.name,
            f"http://{LOOPBACK}:{proc.ready['port']}/v1/{route}",
            str(proc.ready["public_key"]),
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        await super().stop()

    async def _one(self, client: BaselineClient, image: np.ndarray, deadline_ms: int) -> Outcome:
        raise NotImplementedError

    async def classify(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        indices: Sequence[int],
        concurrency: int,
        deadline_ms: int,
    ) -> list[dict[str, Any]]:
        if self.session is None:
            raise SimError(f"{self.label} is not started")
        client = BaselineClient(self.identity, self.session)
        queue = list(indices)
        rows: list[dict[str, Any]] = []

        async def worker() -> None:
            while queue:
                i = queue.pop(0)
                out = await self._one(client, images[i : i + 1, None], deadline_ms)
                rows.append(
                    {
                        "i": i,
                        "label": int(labels[i]),
                        "pred": out.pred,
                        "latency_ms": out.latency_ms,
                        "error": out.error,
                    }
                )

        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, concurrency)):
                group.create_task(worker())
        return rows


class ChainSwarm(_BaselineSwarm):
    approach = "model"
    role = "stage"

    def __init__(self, cluster: Cluster, tag: str, folder: Path, plan: list[split.Stage]) -> None:
        super().__init__(cluster, tag, [folder / s.file for s in plan])
        self.label = f"model n={self.size} ({self.size} stages)"

    def answerable(self) -> tuple[int, ...]:
        return () if self.dead else ALL_CLASSES

    async def _one(self, client: BaselineClient, image: np.ndarray, deadline_ms: int) -> Outcome:
        return await client.chain(image, self.devices, deadline_ms)


class GroupSwarm(_BaselineSwarm):
    approach = "class"
    role = "group"

    def __init__(self, cluster: Cluster, tag: str, folder: Path, grouping: dict[str, Any]) -> None:
        members = grouping["members"]
        super().__init__(cluster, tag, [folder / m["file"] for m in members])
        self.classes = [tuple(m["classes"]) for m in members]
        self.label = f"class n={self.size} ({grouping['name']})"

    def _device(self, proc: Proc, index: int) -> Device:
        base = super()._device(proc, index)
        return Device(base.name, base.url, base.key, self.classes[index])

    def answerable(self) -> tuple[int, ...]:
        return tuple(
            sorted(
                c
                for n, cs in zip(self.names, self.classes, strict=True)
                if n not in self.dead
                for c in cs
            )
        )

    async def _one(self, client: BaselineClient, image: np.ndarray, deadline_ms: int) -> Outcome:
        return await client.groups(image, self.devices, deadline_ms)
