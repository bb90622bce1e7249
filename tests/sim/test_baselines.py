"""The baselines' parts: the stage split, the signed wire format, the socket meter, and
the requester against real baseline peer processes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from sim.baselines import meter, split, wire
from sim.baselines.client import BaselineClient, Device
from sim.procs import Cluster
from sim.runners.compare import _reference
from swarm.crypto.identity import Identity
from variants.data import load_split


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    test = load_split("test")
    return test.images[:32], test.labels[:32]


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_stage_chain_reproduces_the_whole_model(
    stages: int, tmp_path: Path, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    plan = split.split(_reference(), stages, tmp_path)
    assert len(plan) == stages
    assert plan[0].input == "input" and plan[-1].output == "probs"
    for a, b in itertools.pairwise(plan):
        assert a.output == b.input  # each stage's output is the next one's input
    x = held_out[0][:, None].astype(np.float32) / 255
    assert split.check_chain(_reference(), tmp_path, plan, x) <= split.CHAIN_TOL
    # The cut shares the work: no stage has more than twice an equal share of MACs.
    total = sum(s.macs for s in plan)
    assert max(s.macs for s in plan) < 2 * total / stages


def test_balanced_cuts_rejects_impossible_stage_counts() -> None:
    with pytest.raises(split.SplitError, match="stages must be"):
        split.balanced_cuts([1] * 19, 1)
    with pytest.raises(split.SplitError, match="stages must be"):
        split.balanced_cuts([1] * 19, 40)


def test_wire_round_trip_and_bounds() -> None:
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    head, got = wire.decode(wire.encode({"id": "a"}, x))
    assert head["id"] == "a" and np.array_equal(got, x)
    body = wire.encode({"id": "a"}, x)
    for bad, why in (
        (b"\x00", "shorter"),
        (body[:-1], "tensor of"),
        (b"\x00\x00\x00\x02{}", "dtype"),
        (b"\x00\x00\x00\x03[1]", "not a JSON object"),
        (b"\xff\xff\xff\xff" + body[4:], "head length"),
    ):
        with pytest.raises(wire.BaselineWireError, match=why):
            wire.decode(bad)


def test_signatures_bind_the_fields() -> None:
    me = Identity.generate()
    fields = {"id": "x", "probs": "abc"}
    sig = wire.sign(me, "reply", fields)
    wire.check(me.public_key_b64, sig, "reply", fields)
    with pytest.raises(wire.BaselineWireError, match="bad signature"):
        wire.check(me.public_key_b64, sig, "reply", {**fields, "id": "y"})
    with pytest.raises(wire.BaselineWireError, match="bad signature"):
        wire.check(me.public_key_b64, sig, "request", fields)  # another domain
    with pytest.raises(wire.BaselineWireError, match="base64"):
        wire.check("not base64!", sig, "reply", fields)


def test_meter_parses_tcp_info() -> None:
    text = (
        "0 0 127.0.0.1:4000 127.0.0.1:5000\n"
        "\t cubic bytes_sent:120 bytes_acked:121 bytes_received:30 segs_out:4\n"
        "0 0 127.0.0.1:4000 127.0.0.1:5001\n"
        "\t cubic bytes_received:7\n"
    )
    assert meter.parse(text) == {
        ("127.0.0.1", 4000, "127.0.0.1", 5000): (120, 30),
        ("127.0.0.1", 4000, "127.0.0.1", 5001): (0, 7),
    }


@pytest.mark.slow
async def test_chain_answers_and_a_dead_stage_is_no_answer_within_the_deadline(
    tmp_path: Path, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    from sim.baselines.setups import ChainSwarm

    plan = split.split(_reference(), 2, tmp_path / "stages")
    images, labels = held_out
    async with Cluster(tmp_path, use_netns=False) as cluster:
        swarm = ChainSwarm(cluster, "mp", tmp_path / "stages", plan)
        await swarm.start()
        try:
            rows = await swarm.classify(images, labels, range(8), 2, 2000)
            assert all(r["pred"] is not None for r in rows)
            assert sum(r["pred"] == r["label"] for r in rows) >= 6
            assert swarm.session is not None
            client = BaselineClient(Identity.generate(), swarm.session)
            # A tampered chain (the wrong key for the last stage) is refused, not trusted.
            wrong = [swarm.devices[0], Device("x", swarm.devices[1].url, swarm.devices[0].key)]
            out = await client.chain(images[:1, None], wrong, 2000)
            assert out.pred is None and out.error is not None
            await swarm.kill(swarm.names[1])
            rows = await swarm.classify(images, labels, range(4), 1, 2000)
            assert all(r["pred"] is None and r["error"] for r in rows)
            assert max(r["latency_ms"] for r in rows) < 2000
            assert swarm.answerable() == ()
        finally:
            await swarm.stop()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["running"] is False


@pytest.mark.slow
async def test_baseline_peer_refuses_bad_bodies(tmp_path: Path) -> None:
    from sim.baselines.setups import ChainSwarm

    plan = split.split(_reference(), 2, tmp_path / "stages")
    async with Cluster(tmp_path, use_netns=False) as cluster:
        swarm = ChainSwarm(cluster, "mp", tmp_path / "stages", plan)
        await swarm.start()
        try:
            url = swarm.devices[0].url
            async with aiohttp.ClientSession() as http:
                async with http.post(url, data=b"junk") as resp:
                    assert resp.status == 400
                    assert "error" in await resp.json()
                image = np.zeros((1, 1, 28, 28), np.uint8)
                head = {
                    "id": "a",
                    "deadline_ms": wire.unix_ms() + 1000,
                    "requester": Identity.generate().public_key_b64,
                    "chain": [{"url": url, "key": swarm.devices[0].key}],
                    "hop": 0,
                }
                for bad in ({"chain": [1]}, {"deadline_ms": "soon"}, {"id": 7}):
                    async with http.post(url, data=wire.encode({**head, **bad}, image)) as resp:
                        assert resp.status == 400
                        assert "must be" in (await resp.json())["error"]
                async with http.post(url, data=wire.encode(head, image)) as resp:
                    assert resp.status == 403  # unsigned
                wrong_shape = np.zeros((1, 28, 28), np.uint8)
                async with http.post(url, data=wire.encode(head, wrong_shape)) as resp:
                    assert resp.status == 400
                    assert "this model takes" in (await resp.json())["error"]
        finally:
            await swarm.stop()
