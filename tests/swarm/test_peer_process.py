"""Real peer processes on 127.0.0.1: discovery, classification, crashes, shutdown, errors.

Every process binds to 127.0.0.1 only (HTTP and mDNS) and joins a swarm name of its own,
so concurrent runs on this machine cannot see each other's peers. The shipped variants
are used when they exist (the accuracy checks need them); otherwise the tiny models of
conftest stand in, and only agreement with the offline ensemble is checked.
"""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.swarm.procs import (
    Models,
    PeerProcess,
    ProcessGroup,
    http,
    json_lines,
    load_models,
    offline_ensemble,
    process_group,
    read_line_unbuffered,
    wait_until,
    write_samples,
)

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"
DISCOVERY_S = 20.0  # bound on mDNS convergence; tests go on as soon as it happens
CLI_TIMEOUT_S = 120.0
N_IMAGES = 20


@dataclasses.dataclass
class Swarm:
    name: str
    group: ProcessGroup
    peers: list[PeerProcess]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """The shipped manifest, or a tiny stand-in when the variants are not exported yet."""
    return load_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    """Held-out Fashion-MNIST test images as .npy files (a fixed random sample) and labels."""
    return write_samples(tmp_path_factory.mktemp("samples"))


def new_swarm_name() -> str:
    return f"pp-{uuid.uuid4().hex[:12]}"


def start_swarm(group: ProcessGroup, models: Models, variants: list[str]) -> Swarm:
    """Start one peer per variant, wait until each is ready and sees all the others."""
    name = new_swarm_name()
    peers = [group.start_peer(v, swarm=name, extra=models.flags) for v in variants]
    for peer in peers:
        peer.wait_ready()
    for peer in peers:
        others = {p.peer_id for p in peers} - {peer.peer_id}
        wait_until(
            lambda peer=peer, others=others: others <= seen_by(peer),
            timeout=DISCOVERY_S,
            what=f"{peer.name} to see {len(others)} peers",
        )
    return Swarm(name, group, peers)


def info(peer: PeerProcess) -> dict[str, Any]:
    status, body = http("GET", peer.url("/v1/info"))
    assert status == 200, body
    return dict(body)


def seen_by(peer: PeerProcess, *, usable_only: bool = False) -> set[str]:
    return {p["peer_id"] for p in info(peer)["peers"] if not (usable_only and p["suspected"])}


def classify_cli(
    models: Models, swarm: Swarm, images: list[Path], *extra: str
) -> list[dict[str, Any]]:
    """Run ``python -m swarm.classify --json`` on 127.0.0.1; its JSON lines, one per image."""
    wait_peers = len(swarm.peers)
    done = swarm.group.run_module(
        "swarm.classify",
        [
            *("--interface", LOOPBACK, "--swarm", swarm.name, "--json", *models.flags),
            *("--wait-peers", str(wait_peers), "--wait", str(DISCOVERY_S)),
            *extra,
            *map(str, images),
        ],
        timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = json_lines(done.stdout)
    assert len(lines) == len(images), done.stdout[-3000:]
    return lines


def npy(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, pixels, allow_pickle=False)
    return buf.getvalue()


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def post_classify(peer: PeerProcess, body: bytes, query: str = "") -> tuple[int, Any]:
    return http("POST", peer.url(f"/v1/classify{query}"), body)


@pytest.fixture(scope="module")
def swarm5(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    """Up to five peers, one per variant, that all see each other; shared read-only."""
    with process_group(tmp_path_factory.mktemp("swarm5")) as group:
        yield start_swarm(group, models, [s.name for s in models.manifest.variants][:5])


@pytest.fixture
def group(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Processes of one test, killed at teardown whatever happened."""
    with process_group(tmp_path / "procs") as g:
        yield g


# --- a running swarm ---------------------------------------------------------------------


def test_peers_discover_each_other_with_variants(swarm5: Swarm, models: Models) -> None:
    """Each peer's /v1/info lists every other peer with the variant and hash it serves."""
    expected = {p.peer_id: p.variant for p in swarm5.peers}
    for peer in swarm5.peers:
        body = info(peer)
        assert (body["peer_id"], body["variant"], body["swarm"]) == (
            peer.peer_id,
            peer.variant,
            swarm5.name,
        )
        seen = {p["peer_id"]: p for p in body["peers"] if p["peer_id"] in expected}
        assert {pid: p["variant"] for pid, p in seen.items()} == {
            pid: v for pid, v in expected.items() if pid != peer.peer_id
        }
        for pid, p in seen.items():
            assert p["model_sha256"] == models.manifest.get(expected[pid]).sha256
            assert p["addresses"] == [LOOPBACK]


def test_classify_cli_reaches_the_ensemble_accuracy(
    swarm5: Swarm, models: Models, samples: tuple[list[Path], np.ndarray]
) -> None:
    """classify --json on held-out images: sum equals the offline ensemble, robust as accurate."""
    paths, labels = samples[0][:N_IMAGES], samples[1][:N_IMAGES]
    offline = offline_ensemble(models, paths)
    summed = classify_cli(models, swarm5, paths, "--rule", "sum")
    assert [line["class"] for line in summed] == offline.tolist()
    robust = classify_cli(models, swarm5, paths)
    got = np.array([line["class"] for line in robust])
    peers = {p.peer_id: p.variant for p in swarm5.peers}
    for line, path in zip(robust, paths, strict=True):
        assert line["image"] == str(path)
        assert line["rule"] == "robust"
        assert line["rejected"] == []
        assert line["replies"]
        assert all(peers[r["peer"]] == r["variant"] for r in line["replies"])
    offline_correct = int((offline == labels).sum())
    assert int((got == labels).sum()) >= offline_correct - 1
    if models.trained:
        assert offline_correct / len(labels) >= 0.85  # the ensemble is ~95% accurate


def test_http_classify_on_a_peer(
    swarm5: Swarm, models: Models, samples: tuple[list[Path], np.ndarray]
) -> None:
    """POST /v1/classify with a PNG or .npy makes that peer the requester; same decision."""
    paths, labels = samples
    pixels = np.load(paths[0])
    offline = offline_ensemble(models, [paths[0]])[0]
    for body in (png(pixels), npy(pixels)):
        status, decision = post_classify(swarm5.peers[0], body, "?rule=sum")
        assert status == 200, decision
        assert decision["class"] == offline
        assert decision["label"] == models.manifest.class_names[offline]
        assert decision["replies"]
    if models.trained:
        assert offline == labels[0]


def test_http_bad_input_is_a_4xx_and_the_peer_keeps_serving(swarm5: Swarm) -> None:
    """A live peer answers garbage on every endpoint with a JSON 4xx, never a 500."""
    peer = swarm5.peers[0]
    for method, path, body in [
        ("POST", "/v1/link", b"garbage"),
        ("GET", "/v1/link", None),  # not a WebSocket upgrade
        ("POST", "/v1/classify", b"garbage"),
        ("POST", "/v1/classify?k=0", npy(np.zeros((28, 28), np.uint8))),
        ("POST", "/v1/classify?variants=NOPE", npy(np.zeros((28, 28), np.uint8))),
        ("GET", "/v1/infer", None),  # retired with the links
        ("GET", "/nowhere", None),
    ]:
        status, answer = http(method, peer.url(path), body)
        assert 400 <= status < 500, (path, status, answer)
        assert answer["error"]
    assert http("GET", peer.url("/healthz"))[0] == 200
    status, text = http("GET", peer.url("/metrics"))
    assert status == 200
    assert 'vswarm_requests_total{endpoint="/v1/link",status="400"}' in text
    assert 'vswarm_requests_total{endpoint="/v1/classify",status="400"}' in text


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig (dnsutils) is not installed")
def test_dig_sees_the_services(swarm5: Swarm) -> None:
    """A standard DNS-SD client (dig to 127.0.0.1:5353) sees every peer's PTR record."""
    wanted = {p.peer_id for p in swarm5.peers}
    seen: set[str] = set()

    def probe() -> bool:
        # Every responder on this host shares UDP 5353; the kernel gives one of them each
        # unicast query (by source port), so ask until each of ours has answered.
        out = subprocess.run(
            [
                "dig",
                "+time=1",
                "+tries=1",
                "-p",
                "5353",
                f"@{LOOPBACK}",
                "_vswarm._tcp.local",
                "PTR",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        seen.update(re.findall(r"IN\s+PTR\s+([0-9a-f]{20})\._vswarm\._tcp\.local\.", out))
        return wanted <= seen

    wait_until(probe, timeout=60, interval=0.0, what=f"dig to see {wanted - seen}")


def test_auto_picks_the_best_uncovered_variant(group: ProcessGroup, models: Models) -> None:
    """--variant auto, in a swarm serving the two most accurate variants, picks the third."""
    ranked = models.by_accuracy()
    swarm = start_swarm(group, models, ranked[:2])
    auto = group.start_peer(
        "auto", swarm=swarm.name, name="auto", extra=[*models.flags, "--browse-s", "5"]
    )
    assert auto.wait_ready()["variant"] == ranked[2]
    assert "variant_auto_selected" in auto.stderr_text()
    assert '"reason": "uncovered"' in auto.stderr_text()


# --- crashes and shutdown ----------------------------------------------------------------


def test_sigkill_mid_run_leaves_classification_working(
    group: ProcessGroup, models: Models, samples: tuple[list[Path], np.ndarray]
) -> None:
    """SIGKILL of a peer mid-run: every image still decided; the dead one missing, suspected."""
    a, _, victim = start_swarm(group, models, models.by_accuracy()[:3]).peers
    paths = samples[0]
    cli = group.start_module(
        "swarm.classify",
        [
            *("--interface", LOOPBACK, "--swarm", info(a)["swarm"], "--json", *models.flags),
            *("--wait-peers", "3", "--wait", str(DISCOVERY_S), *map(str, paths)),
        ],
        name="classify",
    )
    assert cli.popen.stdout is not None
    first = read_line_unbuffered(cli.popen.stdout)  # one decision made with all three alive
    victim.stop(signal.SIGKILL)
    out, _ = cli.popen.communicate(timeout=CLI_TIMEOUT_S)
    assert cli.popen.returncode == 0, cli.stderr_text()[-3000:]
    lines = json_lines((first + out).decode())
    assert len(lines) == len(paths), cli.stderr_text()[-3000:]
    assert all(line["replies"] for line in lines)

    # A peer that knew the victim: its first call after the crash reports it, and
    # classification keeps working while the victim is backed off and then suspected.
    reported: set[str] = set()

    def victim_suspected() -> bool:
        status, decision = post_classify(a, npy(np.load(paths[0])))
        assert status == 200, decision
        assert victim.peer_id not in {r["peer"] for r in decision["replies"]}
        reported.update(decision["missing"] + decision["skipped"])
        record = next((p for p in info(a)["peers"] if p["peer_id"] == victim.peer_id), None)
        return record is None or record["suspected"]

    wait_until(victim_suspected, timeout=30, interval=0.2, what="the dead peer to be suspected")
    assert victim.peer_id in reported


def test_sigterm_exits_zero_says_goodbye_and_keeps_identity(
    group: ProcessGroup, models: Models
) -> None:
    """SIGTERM: exit 0, goodbye drops it at once, reputation saved; restart keeps its id."""
    swarm = start_swarm(group, models, models.by_accuracy()[:3])
    a, leaving, c = swarm.peers
    assert leaving.stop(signal.SIGTERM) == 0
    stderr = leaving.stderr_text()
    assert "Traceback" not in stderr
    assert "peer_stopped" in stderr
    data_dir = group.workdir / leaving.name
    assert (data_dir / "reputation.json").is_file()
    for peer in (a, c):
        # The goodbye removes it long before its mDNS TTL (120 s) would.
        wait_until(
            lambda peer=peer: leaving.peer_id not in seen_by(peer),
            timeout=10,
            what=f"{peer.name} to drop the peer that left",
        )
    again = group.start_peer(
        leaving.variant, swarm=swarm.name, name="again", data_dir=data_dir, extra=models.flags
    )
    assert again.wait_ready()["peer_id"] == leaving.peer_id
    assert again.stop(signal.SIGINT) == 0


# --- startup errors ----------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        yield sock.getsockname()[1]


def _startup_cases(tmp: Path, port: int) -> dict[str, tuple[list[str], str]]:
    bad_trust = tmp / "trust.txt"
    bad_trust.write_text("not-a-key peer-a\n", encoding="utf-8")
    a_file = tmp / "a-file"
    a_file.write_text("", encoding="utf-8")
    return {
        "bad flag": (["--port", "http"], "not a port"),
        "unknown variant": (["--variant", "V99"], "unknown variant 'V99'"),
        "missing manifest": (["--manifest", str(tmp / "none.json")], "manifest not found"),
        "port in use": (["--port", str(port)], "already in use"),
        "bad trust file": (["--trust", str(bad_trust)], "trust.txt:1"),
        "unwritable data dir": (["--data-dir", str(a_file / "sub")], "data directory"),
        "bad interface": (["--interface", "eth0"], "not an IPv4 address"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "bad flag",
        "unknown variant",
        "missing manifest",
        "port in use",
        "bad trust file",
        "unwritable data dir",
        "bad interface",
    ],
)
def test_startup_errors_exit_2_with_one_clear_line(
    case: str, group: ProcessGroup, models: Models, tmp_path: Path, busy_port: int
) -> None:
    """Each startup error exits 2 with one 'error:' line on stderr and no traceback."""
    extra, message = _startup_cases(tmp_path, busy_port)[case]
    variant = models.manifest.variants[0].name
    args = [
        *("--variant", variant, "--interface", LOOPBACK, "--port", "0"),
        *("--swarm", new_swarm_name(), "--data-dir", str(tmp_path / "data")),
        *models.flags,
    ]
    done = group.run_module("swarm.peer", [*args, *extra], timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr[-2000:]
    assert message in errors[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    if case == "unknown variant":
        assert all(s.name in errors[0] for s in models.manifest.variants)


def test_help_documents_every_flag(group: ProcessGroup) -> None:
    """--help exits 0 and describes each flag of the peer."""
    done = group.run_module("swarm.peer", ["--help"], timeout=60)
    assert done.returncode == 0
    for flag in (
        "--variant",
        "--interface",
        "--port",
        "--swarm",
        "--data-dir",
        "--trust",
        "--log-format",
        "--threads",
        "--manifest",
        "--latency-budget-ms",
    ):
        assert flag in done.stdout
