"""Start, watch and stop real peer processes (and the classify CLI) in tests.

Also what those processes run on: the model set (the shipped variants, or conftest's
tiny models when they are missing), held-out test images as files, and the ensemble's
answer computed offline to compare the swarm with.

A ``ProcessGroup`` owns every process it starts and kills whatever is still running when
it closes, whether the test passed or not. A peer is ready when it prints its ready line
on stdout; ``PeerProcess.wait_ready`` waits for that line with a deadline and reports
the peer's stderr if it died first. HTTP helpers talk to 127.0.0.1 or to addresses
inside the test's own network namespaces only.

``prefix`` runs a command inside something, e.g. ``["ip", "netns", "exec", "ns1"]``:
``ip netns exec`` execs the command in place, so the pid is the peer's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from swarm.errors import ConfigError
from swarm.inference.manifest import Manifest, default_manifest_path, load_manifest
from tests.swarm.conftest import TINY_VARIANTS, build_tiny_model, model_entry, write_manifest
from variants.data import load_split
from variants.ensemble import ensemble_predict

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
READY_TIMEOUT_S = 60.0  # importing onnxruntime and probing mDNS; seconds on a slow CI box
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 10.0
SAMPLE_SEED = 20_231_101

T = TypeVar("T")


class ProcessFailedError(AssertionError):
    """A process exited early, or did not get ready in time; carries its stderr."""


class PeerProcess:
    """One ``python -m swarm.peer`` process."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.stderr_path = stderr_path
        self.ready: dict[str, Any] | None = None
        self._pending = b""

    def __repr__(self) -> str:
        return f"<PeerProcess {self.name} pid={self.popen.pid} rc={self.popen.poll()}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def peer_id(self) -> str:
        return str(self._ready()["peer_id"])

    @property
    def port(self) -> int:
        return int(self._ready()["port"])

    @property
    def variant(self) -> str:
        return str(self._ready()["variant"])

    def _ready(self) -> dict[str, Any]:
        if self.ready is None:
            raise ProcessFailedError(f"{self.name} is not ready yet: call wait_ready()")
        return self.ready

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Read stdout until the ready line; raise with stderr if the process dies first."""
        if self.ready is not None:
            return self.ready
        stdout = self.popen.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in self._pending:
                    line, self._pending = self._pending.split(b"\n", 1)
                    event = _json_line(line)
                    if event is not None and event.get("event") == "ready":
                        self.ready = event
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProcessFailedError(
                        f"{self.name} not ready after {timeout} s; stderr:\n{self.stderr_text()}"
                    )
                if not sel.select(left):
                    continue
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    rc = self.popen.wait(timeout=STOP_TIMEOUT_S)
                    raise ProcessFailedError(
                        f"{self.name} exited with {rc} before it was ready; stderr:\n"
                        f"{self.stderr_text()}"
                    )
                self._pending += chunk

    def send(self, sig: signal.Signals) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and wait for the exit status (SIGKILL if it does not exit in time)."""
        self.send(sig)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise ProcessFailedError(
                f"{self.name} ignored {sig.name} for {timeout} s; stderr:\n{self.stderr_text()}"
            ) from None

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


class ProcessGroup:
    """Every process a test starts; ``close`` (or leaving the ``with``) kills the rest."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.peers: list[PeerProcess] = []
        workdir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_peer(
        self,
        variant: str,
        *,
        swarm: str,
        interface: str = "127.0.0.1",
        name: str | None = None,
        data_dir: Path | None = None,
        extra: Sequence[str] = (),
        prefix: Sequence[str] = (),
    ) -> PeerProcess:
        """Start ``python -m swarm.peer`` on one interface; does not wait for ready."""
        name = name or f"peer{len(self.peers)}-{variant}"
        args = [
            *("--variant", variant, "--interface", interface, "--port", "0"),
            *("--swarm", swarm, "--log-format", "json"),
            *("--data-dir", str(data_dir or self.workdir / name)),
            *extra,
        ]
        return self.start_module("swarm.peer", args, name=name, prefix=prefix)

    def start_module(
        self, module: str, args: Sequence[str], *, name: str, prefix: Sequence[str] = ()
    ) -> PeerProcess:
        stderr_path = self.workdir / f"{name}.stderr"
        with stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                [*prefix, PYTHON, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO,
                env=_env(),
                start_new_session=True,  # a Ctrl-C of pytest does not reach it twice
            )
        peer = PeerProcess(name, popen, stderr_path)
        self.peers.append(peer)
        return peer

    def run_module(
        self, module: str, args: Sequence[str], *, timeout: float, prefix: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m module args`` to completion (killed after ``timeout`` s)."""
        return subprocess.run(
            [*prefix, PYTHON, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=REPO,
            env=_env(),
            timeout=timeout,
            check=False,
        )

    def close(self) -> None:
        """SIGTERM every live process, then SIGKILL those that linger."""
        live = [p for p in self.peers if p.popen.poll() is None]
        for peer in live:
            with contextlib.suppress(ProcessLookupError):
                peer.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for peer in live:
            try:
                peer.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                peer.popen.kill()
                peer.popen.wait()
        for peer in self.peers:
            if peer.popen.stdout is not None:
                peer.popen.stdout.close()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONWARNINGS", None)
    return env


def _json_line(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def read_line_unbuffered(stream: IO[bytes]) -> bytes:
    """One line of a child's stdout, read byte by byte from its descriptor.

    ``stream.readline()`` would buffer what follows the line, and a later
    ``Popen.communicate(timeout=...)`` reads the descriptor directly: the buffered lines
    would be lost.
    """
    fd = stream.fileno()
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a process's stdout, one per line (other lines ignored)."""
    return [obj for line in text.splitlines() if (obj := _json_line(line.encode())) is not None]


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT_S,
) -> tuple[int, Any]:
    """One HTTP call; returns (status, parsed JSON or text) for any status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, raw, ctype = resp.status, resp.read(), resp.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, raw, ctype = exc.code, exc.read(), exc.headers.get_content_type()
    if ctype == "application/json":
        return status, json.loads(raw)
    return status, raw.decode("utf-8", errors="replace")


def wait_until(
    probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll ``probe`` until it returns something other than None or False (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def process_group(workdir: Path) -> Iterator[ProcessGroup]:
    """A ProcessGroup that is always closed."""
    group = ProcessGroup(workdir)
    try:
        yield group
    finally:
        group.close()


# --- what the peers run on ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Models:
    """The manifest the peers run, and whether its models are the trained ones."""

    manifest: Manifest
    trained: bool

    @property
    def flags(self) -> list[str]:
        return ["--manifest", str(self.manifest.path)]

    def by_accuracy(self) -> list[str]:
        """Variant names, most accurate first."""
        ordered = sorted(self.manifest.variants, key=lambda s: (-s.val_accuracy, s.name))
        return [s.name for s in ordered]


def load_models(spare_dir: Path) -> Models:
    """The shipped variants if they are all there; else tiny ones written to ``spare_dir``."""
    try:
        shipped = load_manifest(default_manifest_path())
        if len(shipped.variants) >= 3 and all(s.file.is_file() for s in shipped.variants):
            return Models(shipped, trained=True)
    except ConfigError:
        pass
    (spare_dir / "models").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, seed in TINY_VARIANTS.items():
        data = build_tiny_model(seed=seed)
        (spare_dir / f"models/{name}.onnx").write_bytes(data)
        entries.append(
            model_entry(name, f"models/{name}.onnx", data, val_accuracy=0.8 + seed / 100)
        )
    return Models(load_manifest(write_manifest(spare_dir, entries)), trained=False)


def write_samples(folder: Path, count: int = 100) -> tuple[list[Path], npt.NDArray[np.int64]]:
    """A fixed random sample of held-out test images as .npy files, and their labels."""
    test = load_split("test")
    idx = np.random.default_rng(SAMPLE_SEED).choice(len(test), size=count, replace=False)
    paths = []
    for i in idx:
        path = folder / f"test-{i:05d}.npy"
        np.save(path, test.images[i], allow_pickle=False)
        paths.append(path)
    return paths, test.labels[idx]


def offline_ensemble(models: Models, paths: Sequence[Path]) -> npt.NDArray[np.int64]:
    """The paper's ensemble (sum of every variant's top-2) computed here, without a swarm."""
    x = np.stack([np.load(p).astype(np.float32) / 255.0 for p in paths])[:, None]
    probs = []
    for spec in models.manifest.variants:
        session = ort.InferenceSession(str(spec.file), providers=["CPUExecutionProvider"])
        probs.append(np.asarray(session.run(None, {"input": x})[0], dtype=np.float64))
    return ensemble_predict(probs, k=2)
