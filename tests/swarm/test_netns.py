"""Five peers on five "hosts" (network namespaces on a private bridge) and a sixth that asks.

This is the issue's "done means": the peers find each other with no configuration but the
swarm name (real multicast between namespaces), ``python -m swarm.classify --json`` from
another namespace classifies held-out test images at the ensemble's accuracy, and killing
two peers leaves classification working. Every namespace is the lab's own (sim.netns),
removed at the end whatever happens; nothing touches the machine's own interfaces.
"""

from __future__ import annotations

import contextlib
import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sim import netns
from tests.swarm.procs import (
    Models,
    PeerProcess,
    ProcessGroup,
    json_lines,
    load_models,
    offline_ensemble,
    read_line_unbuffered,
    wait_until,
    write_samples,
)

_OK, _WHY = netns.available()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(not _OK, reason=f"network namespaces unavailable: {_WHY}"),
]
N_IMAGES = 20
DISCOVERY_S = 30.0  # bound on mDNS convergence; the test goes on as soon as it happens
CLI_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """The shipped variants, or tiny stand-ins when they are missing."""
    return load_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    """Held-out test images as .npy files, and their labels."""
    return write_samples(tmp_path_factory.mktemp("samples"))


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    """A private LAN of six hosts; every namespace is deleted at teardown."""
    with netns.Lab() as lab:
        for i in range(1, 7):
            lab.add_host(f"host{i}")
        yield lab


def peers_seen(peer: PeerProcess) -> set[str]:
    """Peer ids this peer logged as discovered (its JSON log on stderr)."""
    seen = set()
    for line in peer.stderr_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "peer_seen":
                seen.add(str(event.get("peer")))
    return seen


def classify_from(
    group: ProcessGroup,
    host: netns.Host,
    *,
    swarm: str,
    models: Models,
    wait_peers: int,
    images: list[Path],
) -> list[dict[str, Any]]:
    done = group.run_module(
        "swarm.classify",
        [
            *("--interface", host.ip, "--swarm", swarm, "--json", *models.flags),
            *("--wait-peers", str(wait_peers), "--wait", str(DISCOVERY_S)),
            *map(str, images),
        ],
        timeout=CLI_TIMEOUT_S,
        prefix=host.exec_prefix(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = json_lines(done.stdout)
    assert len(lines) == len(images), done.stdout[-3000:]
    return lines


def test_five_namespaced_peers_classify_and_survive_two_crashes(
    lab: netns.Lab,
    tmp_path: Path,
    models: Models,
    samples: tuple[list[Path], np.ndarray],
) -> None:
    """Peers in 5 namespaces find each other; a 6th classifies; 2 killed, it still works."""
    swarm = f"ns-{uuid.uuid4().hex[:10]}"
    variants = [s.name for s in models.manifest.variants][:5]
    hosts = [lab.hosts[f"host{i}"] for i in range(1, len(variants) + 1)]
    asker = lab.hosts["host6"]
    paths, labels = samples
    with ProcessGroup(tmp_path / "procs") as group:
        peers = [
            group.start_peer(
                variant,
                swarm=swarm,
                interface=host.ip,
                name=f"{host.name}-{variant}",
                extra=models.flags,
                prefix=host.exec_prefix(),
            )
            for host, variant in zip(hosts, variants, strict=True)
        ]
        for peer in peers:
            peer.wait_ready()
        ids = {p.peer_id for p in peers}
        for peer in peers:
            wait_until(
                lambda peer=peer: ids - {peer.peer_id} <= peers_seen(peer),
                timeout=DISCOVERY_S,
                what=f"{peer.name} to discover the other namespaces' peers",
            )

        # A sixth host classifies held-out images, knowing nothing but the swarm name.
        first = paths[:N_IMAGES]
        lines = classify_from(
            group, asker, swarm=swarm, models=models, wait_peers=len(peers), images=first
        )
        got = np.array([line["class"] for line in lines])
        offline = offline_ensemble(models, first)
        correct, offline_correct = (
            int((got == labels[:N_IMAGES]).sum()),
            int((offline == labels[:N_IMAGES]).sum()),
        )
        assert correct >= offline_correct - 1
        replied = {r["peer"] for line in lines for r in line["replies"]}
        assert replied <= ids
        assert len(replied) >= 3

        # Kill two peers while a requester that knows them is classifying.
        cli = group.start_module(
            "swarm.classify",
            [
                *("--interface", asker.ip, "--swarm", swarm, "--json", *models.flags),
                *("--wait-peers", str(len(peers)), "--wait", str(DISCOVERY_S)),
                *map(str, paths),
            ],
            name="classify-during-crash",
            prefix=asker.exec_prefix(),
        )
        assert cli.popen.stdout is not None
        head = read_line_unbuffered(cli.popen.stdout)
        dead = peers[:2]
        for peer in dead:
            peer.stop(signal.SIGKILL)
        tail, _ = cli.popen.communicate(timeout=CLI_TIMEOUT_S)
        assert cli.popen.returncode == 0, cli.stderr_text()[-3000:]
        during = json_lines((head + tail).decode())
        assert len(during) == len(paths)
        assert all(line["replies"] for line in during)

        # A fresh requester sees the three survivors and is still accurate.
        after = classify_from(group, asker, swarm=swarm, models=models, wait_peers=3, images=first)
        dead_ids = {p.peer_id for p in dead}
        assert not dead_ids & {r["peer"] for line in after for r in line["replies"]}
        after_correct = int(
            (np.array([line["class"] for line in after]) == labels[:N_IMAGES]).sum()
        )
        if models.trained:
            assert after_correct >= 0.8 * N_IMAGES
