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
import struct
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


def start_peers(
    group: ProcessGroup,
    hosts: list[netns.Host],
    variants: list[str],
    *,
    swarm: str,
    models: Models,
) -> list[PeerProcess]:
    """One peer of each variant, each in its host's namespace, once all are ready."""
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
    return peers


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
        peers = start_peers(group, hosts, variants, swarm=swarm, models=models)
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


def test_a_capture_on_the_bridge_holds_no_run_of_the_images_pixels(
    lab: netns.Lab, tmp_path: Path, models: Models
) -> None:
    """The links are sealed: recorded on the requester's bridge port during a classify, the
    traffic shows the link's WebSocket upgrade but no 8-byte run of the image's pixels,
    as uint8 or as float32."""
    swarm = f"ns-{uuid.uuid4().hex[:10]}"
    variants = [s.name for s in models.manifest.variants][:2]
    hosts = [lab.hosts[f"host{i}"] for i in (1, 2)]
    asker = lab.hosts["host3"]
    pixels = np.random.default_rng(7).integers(0, 256, size=(28, 28), dtype=np.uint8)
    image = tmp_path / "secret.npy"
    np.save(image, pixels)
    capture = tmp_path / "bridge.pcap"
    with ProcessGroup(tmp_path / "procs") as group:
        peers = start_peers(group, hosts, variants, swarm=swarm, models=models)
        recorder = group.start_module(
            "sim.capture",
            ["--interface", asker.port, "--out", str(capture), "--seconds", "90"],
            name="capture",
            prefix=["ip", "netns", "exec", lab.hub],
        )
        assert recorder.popen.stdout is not None
        assert read_line_unbuffered(recorder.popen.stdout).strip() == b"ready"
        lines = classify_from(
            group, asker, swarm=swarm, models=models, wait_peers=len(peers), images=[image]
        )
        assert lines[0]["replies"]
        recorder.stop(signal.SIGTERM)
    recorded = capture.read_bytes()
    assert b"GET /v1/link" in recorded  # the capture saw the links being opened
    # A client's WebSocket frames are masked (RFC 6455 section 5.3), which hides nothing:
    # search the unmasked payloads too.
    payloads = websocket_payloads(recorded)
    assert len(payloads) >= 2 * len(peers)  # hello and asks to each peer, at least
    for raw in (pixels.tobytes(), (pixels.astype(np.float32) / 255).tobytes()):
        runs = [raw[i : i + 8] for i in range(len(raw) - 8)]
        leaked = [run for run in runs if any(run in p for p in [recorded, *payloads])]
        assert not leaked, f"{len(leaked)} runs of the image's bytes are on the wire"


def tcp_streams(pcap: bytes) -> list[bytes]:
    """The TCP payload of each direction of each IPv4 flow in a pcap, reassembled by seq."""
    flows: dict[tuple[bytes, int, bytes, int], dict[int, bytes]] = {}
    at = 24  # the pcap file header
    while at + 16 <= len(pcap):
        (length,) = struct.unpack_from("<I", pcap, at + 8)
        frame = pcap[at + 16 : at + 16 + length]
        at += 16 + length
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4, TCP
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack_from(">H", ip, 2)[0]
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack_from(">HHI", tcp)
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            flows.setdefault((ip[12:16], sport, ip[16:20], dport), {})[seq] = payload
    streams = []
    for segments in flows.values():
        data, end = b"", None
        for seq in sorted(segments):
            chunk = segments[seq]
            if end is not None and seq < end:
                chunk = chunk[end - seq :]  # a retransmission overlaps what we have
            data += chunk
            end = seq + len(segments[seq]) if end is None else max(end, seq + len(segments[seq]))
        streams.append(data)
    return streams


def websocket_payloads(pcap: bytes) -> list[bytes]:
    """The unmasked payload of every WebSocket frame after an HTTP upgrade in ``pcap``."""
    payloads = []
    for stream in tcp_streams(pcap):
        head = stream.find(b"\r\n\r\n")
        if head < 0 or (
            b"Upgrade: websocket" not in stream[:head] and b"upgrade" not in stream[:head]
        ):
            continue
        at = head + 4
        while at + 2 <= len(stream):
            masked, length = stream[at + 1] & 0x80, stream[at + 1] & 0x7F
            at += 2
            if length == 126:
                (length,) = struct.unpack_from(">H", stream, at)
                at += 2
            elif length == 127:
                (length,) = struct.unpack_from(">Q", stream, at)
                at += 8
            key = stream[at : at + 4] if masked else b"\x00" * 4
            at += 4 if masked else 0
            body = stream[at : at + length]
            at += length
            payloads.append(bytes(b ^ key[i % 4] for i, b in enumerate(body)))
    return payloads
