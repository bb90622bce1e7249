"""Tests of the bare swarm (``sim.benchmarks.bare``), the benchmark's lower bound: it
answers what the same models answer in-process, and refuses what it cannot read."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sim.benchmarks.bare import LOOPBACK, PIXELS, REQUEST, BareSwarm
from sim.benchmarks.fleet import BenchError
from sim.benchmarks.measure import inputs, session
from swarm import aio
from swarm.inference.manifest import default_manifest_path, load_manifest

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("V1", "V2", "V3")


def _sum_of_top2(tensors: list[np.ndarray]) -> np.ndarray:
    """The paper's rule over each model's top-2, run here in one process: per image,
    each class's score."""
    manifest = load_manifest(default_manifest_path())
    scores = np.zeros((len(tensors), 10))
    x = np.stack(tensors)
    for name in VARIANTS:
        sess = session(manifest.get(name), threads=1)
        probs = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        for row, p in enumerate(probs):
            for cls in np.argsort(-p, kind="stable")[:2]:
                scores[row, cls] += np.float32(p[cls])
    return scores


def test_bare_swarm_answers_as_the_models_do_in_one_process() -> None:
    tensors = inputs(24)

    async def scores() -> tuple[list[list[float]], list[list[float]], list[int]]:
        async with BareSwarm(VARIANTS) as bare:
            one = [await bare.scores(x) for x in tensors]
            # Concurrent calls are batched by the workers, and each gets its own answer.
            many = await asyncio.gather(*(bare.scores(x) for x in tensors))
            labels = [await bare.classify(x) for x in tensors]
            return one, list(many), labels

    one, many, labels = aio.run(scores())
    want = _sum_of_top2(tensors)
    np.testing.assert_allclose(one, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(many, want, rtol=1e-6, atol=1e-7)
    assert labels == [int(np.argmax(s)) for s in want]
    assert len(set(labels)) > 1  # not all one class: the labels' check means something


def test_bare_worker_closes_a_connection_that_sends_a_bad_frame() -> None:
    async def exchange() -> tuple[bytes, int]:
        async with BareSwarm(("V1",)) as bare:
            port = bare.ports[0]
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(REQUEST.pack(7, PIXELS - 1) + b"\0" * 16)
            async with asyncio.timeout(10):
                data = await reader.read()  # b"" once the worker closes
            writer.close()
            # The worker still serves its other connections.
            x = inputs(1)[0]
            label = await bare.classify(x)
            return data, label

    data, label = aio.run(exchange())
    assert data == b""
    assert 0 <= label < 10


def test_a_bare_worker_that_dies_fails_the_call_with_its_name() -> None:
    async def call_after_kill() -> str:
        async with BareSwarm(("V1",)) as bare:
            bare.processes[0].kill()
            await bare.processes[0].wait()
            # Closed before the call or during it: either way the call fails, naming it.
            with pytest.raises(BenchError) as caught:
                await bare.classify(inputs(1)[0])
            return str(caught.value)

    message = aio.run(call_after_kill())
    assert "bare worker V1" in message


def test_bare_worker_names_an_unknown_variant() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sim.benchmarks.bare", "V99"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "no model named 'V99'" in proc.stderr
    assert "Traceback" not in proc.stderr
