"""The simulated swarm's processes: start, watch, break and stop them.

A ``Cluster`` owns every process it starts: real ``python -m swarm.peer`` peers, fault
agents (``python -m sim.agent``) and the driver (``python -m sim.driver``). As root each
one runs in a namespace host of its own on a private bridge (``sim.netns.Lab``);
otherwise everything runs on 127.0.0.1. Closing the cluster (also after an error or
Ctrl-C) stops every process and deletes every namespace it made. ``OUT/state.json``
describes the running cluster for ``python -m sim.faults``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import structlog

from sim import netns

log = structlog.get_logger("sim.procs")

LOOPBACK: Final = "127.0.0.1"
READY_TIMEOUT_S: Final = 60.0  # onnxruntime import and mDNS probing, on a slow box
STOP_TIMEOUT_S: Final = 10.0
STATE_FILE: Final = "state.json"
# Told of every fault the cluster applies and every result the driver reports (sim.live).
Observer = Callable[[dict[str, Any]], None]


class SimError(RuntimeError):
    """The simulated swarm could not be started or steered; the message says why."""


@dataclasses.dataclass
class Proc:
    """One process of the cluster and what it said when it got ready."""

    name: str
    kind: str  # "peer", "agent" or "driver"
    argv: list[str]
    ip: str
    host: netns.Host | None
    data_dir: Path
    stderr_path: Path
    control: Path | None = None
    process: asyncio.subprocess.Process | None = None
    ready: dict[str, Any] = dataclasses.field(default_factory=dict)
    ready_at: float = 0.0  # unix time
    paused: bool = False

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def peer_id(self) -> str:
        return str(self.ready.get("peer_id", ""))

    def stderr_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Cluster:
    """A swarm of processes on one machine; an async context manager that cleans up."""

    def __init__(
        self,
        out: Path,
        *,
        use_netns: bool,
        swarm: str | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.out = out
        self.use_netns = use_netns
        self.swarm = swarm or f"sim{secrets.token_hex(3)}"
        self.observer = observer
        self.lab: netns.Lab | None = None
        self.procs: dict[str, Proc] = {}
        self._closed = False

    def __repr__(self) -> str:
        mode = "netns" if self.use_netns else "loopback"
        return f"<Cluster {self.swarm} {mode} procs={len(self.procs)}>"

    async def __aenter__(self) -> Self:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        if self.use_netns:
            self.lab = netns.Lab()
            await asyncio.to_thread(self.lab.start)
        self.write_state()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- starting ---

    async def _host(self, name: str) -> tuple[str, netns.Host | None]:
        if self.lab is None:
            return LOOPBACK, None
        host = self.lab.hosts.get(name)
        if host is None:
            host = await asyncio.to_thread(self.lab.add_host, name)
        return host.ip, host

    async def add_peer(
        self,
        name: str,
        variant: str,
        *,
        agent: bool = False,
        threads: int = 1,
        cpus: Sequence[int] | None = None,
        extra: Sequence[str] = (),
    ) -> Proc:
        """Start a peer (a real swarm.peer, or a sim agent for in-process faults)."""
        ip, host = await self._host(name)
        data_dir = self.out / "data" / name
        common = [
            "--variant",
            variant,
            "--interface",
            ip,
            "--port",
            "0",
            "--swarm",
            self.swarm,
            "--data-dir",
            str(data_dir),
            "--log-format",
            "json",
            "--threads",
            str(threads),
        ]
        control = None
        if agent:
            control = self.out / "ctl" / f"{name}.sock"
            control.parent.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "sim.agent", *common, "--control", str(control)]
            if cpus:
                argv += ["--cpus", ",".join(map(str, cpus))]
        else:
            argv = [sys.executable, "-m", "swarm.peer", *common]
            if cpus:
                argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        argv += list(extra)
        proc = Proc(
            name,
            "agent" if agent else "peer",
            argv,
            ip,
            host,
            data_dir,
            self.out / "logs" / f"{name}.log",
            control,
        )
        self.procs[name] = proc
        await self.start(proc)
        return proc

    async def add_driver(self, name: str = "driver", *, hedge_after_ms: float = 250.0) -> Driver:
        ip, host = await self._host(name)
        data_dir = self.out / "data" / name
        argv = [
            sys.executable,
            "-m",
            "sim.driver",
            "--interface",
            ip,
            "--swarm",
            self.swarm,
            "--data-dir",
            str(data_dir),
            "--hedge-after-ms",
            str(hedge_after_ms),
        ]
        proc = Proc(name, "driver", argv, ip, host, data_dir, self.out / "logs" / f"{name}.log")
        self.procs[name] = proc
        await self.start(proc)
        return Driver(proc, self.observer)

    async def start(self, proc: Proc) -> None:
        """(Re)start ``proc`` and wait for its first JSON line ("ready" or "started")."""
        prefix = proc.host.exec_prefix() if proc.host is not None else []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with proc.stderr_path.open("ab") as err:
            proc.process = await asyncio.create_subprocess_exec(
                *prefix,
                *proc.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the simulator only
                limit=16 * 1024 * 1024,
            )
        proc.paused = False
        assert proc.process.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                line = await proc.process.stdout.readline()
        except TimeoutError:
            line = b""
        if not line:
            await self._kill(proc)
            raise SimError(f"{proc.name} did not get ready:\n{proc.stderr_tail()}")
        proc.ready = json.loads(line)
        proc.ready_at = time.time()
        log.info("sim_proc_ready", name=proc.name, kind=proc.kind, pid=proc.pid, ip=proc.ip)
        self.write_state()

    # --- breaking ---

    def signal(self, name: str, sig: signal.Signals) -> None:
        proc = self.procs[name]
        if proc.alive and proc.pid is not None:
            os.kill(proc.pid, sig)
        proc.paused = sig == signal.SIGSTOP
        log.info("sim_signal", name=name, signal=sig.name)
        actions = {signal.SIGKILL: "kill", signal.SIGSTOP: "pause", signal.SIGCONT: "resume"}
        self._observe(actions.get(sig, sig.name), name)

    async def kill(self, name: str) -> None:
        """SIGKILL: a crash, no goodbye on mDNS."""
        proc = self.procs[name]
        self.signal(name, signal.SIGKILL)
        if proc.process is not None:
            await proc.process.wait()
        self.write_state()

    async def stop(self, name: str) -> None:
        """SIGTERM: a clean leave (goodbye on mDNS), SIGKILL if it lingers."""
        await self._stop(self.procs[name])
        self.write_state()
        self._observe("leave", name)

    async def restart(self, name: str) -> Proc:
        proc = self.procs[name]
        if proc.alive:
            await self._stop(proc)
        await self.start(proc)
        self._observe("restart", name)
        return proc

    def partition(self, groups: Sequence[Sequence[str]]) -> None:
        if self.lab is None:
            raise SimError("partitions need network namespaces (run as root)")
        self.lab.partition(groups)
        log.info("sim_partition", groups=[list(g) for g in groups])
        self._observe("partition", " | ".join(",".join(g) for g in groups))

    def heal(self) -> None:
        if self.lab is not None:
            self.lab.heal()
            log.info("sim_heal")
            self._observe("heal", "")

    def _observe(self, action: str, target: str) -> None:
        if self.observer is not None:
            self.observer({"kind": "fault", "action": action, "peer": target, "t": time.time()})

    # --- stopping ---

    async def _stop(self, proc: Proc) -> None:
        process = proc.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            # A stopped process (paused by the sim or by hand with sim.faults) cannot act
            # on SIGTERM: wake it first.
            process.send_signal(signal.SIGCONT)
            process.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await process.wait()
        except TimeoutError:
            await self._kill(proc)

    async def _kill(self, proc: Proc) -> None:
        process = proc.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    async def aclose(self) -> None:
        """Stop every process, delete every namespace; idempotent, survives cancellation."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.gather(*(self._stop(p) for p in self.procs.values()))
        finally:
            for proc in self.procs.values():
                if proc.alive and proc.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
            if self.lab is not None:
                self.lab.close()
            self.write_state()
            log.info("sim_closed", procs=len(self.procs))

    def write_state(self) -> None:
        state = {
            "swarm": self.swarm,
            "running": not self._closed,
            "netns": self.use_netns,
            "lab": None
            if self.lab is None
            else {
                "tag": self.lab.tag,
                "hub": self.lab.hub,
                "hosts": {n: dataclasses.asdict(h) for n, h in self.lab.hosts.items()},
            },
            "procs": {
                p.name: {
                    "kind": p.kind,
                    "pid": p.pid,
                    "alive": p.alive,
                    "paused": p.paused,
                    "ip": p.ip,
                    "port": p.ready.get("port"),
                    "peer_id": p.ready.get("peer_id"),
                    "variant": p.ready.get("variant"),
                    "netns": p.host.netns if p.host else None,
                    "control": str(p.control) if p.control else None,
                }
                for p in self.procs.values()
            },
        }
        tmp = self.out / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.out / STATE_FILE)


class Driver:
    """The JSON-line conversation with ``python -m sim.driver``."""

    def __init__(self, proc: Proc, observer: Observer | None = None) -> None:
        self.proc = proc
        self.observer = observer

    async def send(self, cmd: dict[str, Any]) -> None:
        process = self.proc.process
        if process is None or process.stdin is None:
            raise SimError("the driver is not running")
        process.stdin.write(json.dumps(cmd).encode() + b"\n")
        await process.stdin.drain()

    async def events(self, timeout_s: float) -> AsyncIterator[dict[str, Any]]:
        """The driver's lines until "done" (or one "ready"/"error"), bounded in time."""
        process = self.proc.process
        if process is None or process.stdout is None:
            raise SimError("the driver is not running")
        async with asyncio.timeout(timeout_s):
            while True:
                line = await process.stdout.readline()
                if not line:
                    raise SimError(f"the driver exited:\n{self.proc.stderr_tail()}")
                event = json.loads(line)
                if event.get("event") == "error":
                    raise SimError(f"driver: {event.get('error')}")
                if event.get("event") == "done":
                    return
                if self.observer is not None and event.get("event") in ("result", "gather"):
                    self.observer({**event, "kind": "result"})
                yield event
                if event.get("event") == "ready":
                    return

    async def wait_peers(self, count: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        await self.send({"cmd": "wait", "peers": count, "timeout_s": timeout_s})
        async for event in self.events(timeout_s + 10):
            return list(event["peers"])
        raise SimError("the driver did not confirm the peers")

    async def run(self, cmd: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
        await self.send(cmd)
        return [e async for e in self.events(timeout_s)]


__all__ = ["LOOPBACK", "Cluster", "Driver", "Proc", "SimError"]
