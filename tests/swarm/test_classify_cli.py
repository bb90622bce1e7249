"""Tests of ``python -m swarm.classify``: usage errors, no peers, and a run over mDNS.

Argument and file errors run ``main`` in-process (they fail before any socket opens).
The runs that browse mDNS start the CLI as a subprocess with ``--interface 127.0.0.1``
and a swarm name of their own, so concurrent runs on this machine cannot meet; its peers
are real link servers on 127.0.0.1 (a fixed answer instead of a model) registered with
``Discovery`` on loopback only.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import pytest

from swarm import config
from swarm.cli.classify import _Printer, main
from swarm.config import Timings
from swarm.crypto.identity import Identity, TrustStore
from swarm.discovery.mdns import Discovery
from swarm.discovery.table import Announcement, PeerTable
from swarm.http.api import ServerContext, create_app
from swarm.http.listener import HttpServer
from swarm.inference.engine import InferenceResult
from swarm.inference.manifest import Manifest, ModelSpec
from swarm.link.answer import Answerer
from swarm.link.websocket import LinkServer
from swarm.log import reset_logging
from swarm.metrics import Metrics
from swarm.requester.call import ClassifyResult
from swarm.requester.fanout import Rejection, ReplyInfo
from tests.swarm.conftest import CLASS_NAMES

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = ["127.0.0.1"]
PROG = "python -m swarm.classify: error: "


class Says:
    """A model that answers class ``label`` with probability 0.9."""

    def __init__(self, spec: ModelSpec, label: int) -> None:
        self.spec = spec
        self._probs = np.full(10, 0.1 / 9, np.float32)
        self._probs[label] = 0.9

    async def infer(self, x: object) -> InferenceResult:
        return InferenceResult(self._probs.copy(), 0.0001, 1)


def link_peer(manifest: Manifest, spec: ModelSpec, swarm: str, identity: Identity) -> HttpServer:
    """A peer's HTTP server and link server on 127.0.0.1, answering class 1."""
    model = Says(spec, 1)
    answerer = Answerer(
        identity, model, swarm=swarm, family=manifest.family_id, input_shape=config.INPUT_SHAPE
    )
    ctx = ServerContext(
        identity=identity,
        swarm=swarm,
        links=LinkServer.build(identity, answerer, trust=TrustStore.open()),
        model=model,
        manifest=manifest,
        table=PeerTable(swarm),
        metrics=Metrics(),
    )
    return HttpServer(create_app(ctx), hosts=LOOPBACK, port=0)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() configures logging for the process; put it back for the next test."""
    yield
    reset_logging()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A valid 28x28 uint8 .npy input."""
    path = tmp_path / "shirt.npy"
    np.save(path, np.full((28, 28), 128, dtype=np.uint8))
    return path


@pytest.fixture
def swarm_name() -> str:
    """A swarm name no other test (or concurrent test run) uses."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k", "0"], "argument --k: '0' is not an integer in [1, 10]"),
        (["--rule", "mean"], "argument --rule: invalid choice: 'mean'"),
        (["--deadline-ms", "0"], "argument --deadline-ms: '0' is not an integer in [1, 60000]"),
        (["--interface", "eth0"], "argument --interface: 'eth0' is not an IPv4 address"),
        (["--wait", "-1"], "argument --wait: '-1' is not a number of seconds >= 0"),
        (["--swarm", "a b"], "argument --swarm: 'a b' is not a swarm name"),
        (["--wait-peers", "0"], "argument --wait-peers: '0' is not an integer >= 1"),
        (["--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
        (["--replicas", "0"], "argument --replicas: '0' is neither 'all' nor an integer >= 1"),
        (["--wave", "x"], "argument --wave: 'x' is neither 'auto', 'all' nor an integer >= 1"),
    ],
)
def test_bad_flag_exits_2_with_one_line(
    argv: list[str], message: str, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag: exit status 2 and one line on stderr that names the flag."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, str(image)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_no_image_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Without an image the CLI says what is missing and exits 2."""
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "the following arguments are required: IMAGE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variants", "T1,V9"], "no model named 'V9'"),
        (["--variants", ","], "--variants needs 'all' or a comma-separated list"),
        (["--wait-peers", "4"], "--wait-peers 4 exceeds the 3 variants asked"),
        (["--trust", "MISSING"], "cannot read the allow-list"),
    ],
)
def test_bad_file_or_setting_exits_2(
    extra: list[str],
    message: str,
    image: Path,
    tiny_manifest: Manifest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bad variant name, count or allow-list: exit 2 before touching the network."""
    names = {"MISSING": str(image.parent / "nope.png")}
    argv = [names.get(a, a) for a in extra]
    code = main([str(image), *argv, "--manifest", str(tiny_manifest.path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(PROG)
    assert message in err
    assert err.count("\n") == 1


def test_no_readable_image_exits_2_with_a_line_per_image(
    tmp_path: Path, tiny_manifest: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only unreadable images: exit 2 before the network; with --json one error line per
    image on stdout, in the order given, and one line per image on stderr."""
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"hello, not an image")
    missing = tmp_path / "nope.png"
    code = main([str(missing), str(garbage), "--json", "--manifest", str(tiny_manifest.path)])
    assert code == 2
    captured = capsys.readouterr()
    docs = [json.loads(line) for line in captured.out.splitlines()]
    assert [d["image"] for d in docs] == [str(missing), str(garbage)]
    assert "does not exist" in docs[0]["error"]
    assert "unsupported input" in docs[1]["error"]
    assert all(d["rejected"] == [] and d["missing"] == [] for d in docs)
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert all(line.startswith(PROG) for line in lines)
    assert "does not exist" in lines[0]
    assert str(garbage) in lines[1]


def _result(label: int, *tops: int) -> ClassifyResult:
    replies = tuple(
        ReplyInfo(f"{i:02d}" + "ab" * 9, f"T{i}", ((top, 0.8), (9, 0.1)), 3.0, 0.9)
        for i, top in enumerate(tops, start=1)
    )
    return ClassifyResult(
        label=label,
        class_name=CLASS_NAMES[label],
        confidence=0.7,
        certified_f=1,
        rule="robust",
        latency_ms=12.5,
        replies=replies,
        rejected=(Rejection("03" + "cd" * 9, "bad_signature"),),
        missing=(),
    )


def test_table_names_the_peers_that_dissented() -> None:
    """The table's last column lists each reply whose top-1 is not the decision, as
    VARIANT:PEER=CLASS, and '-' when all agreed."""
    out = io.StringIO()
    printer = _Printer(out, json_lines=False, names=["a.png", "b.png"], classes=CLASS_NAMES)
    printer.row("a.png", _result(1, 1, 1, 4))
    printer.row("b.png", _result(1, 1, 1))
    header, dissent, agreed = out.getvalue().splitlines()
    assert header.split()[-1] == "DISSENT"
    assert dissent.endswith("  T3:03ababab=Coat")
    assert agreed.endswith("  -")
    assert dissent.index("Trouser") == header.index("CLASS")


def test_json_error_line_carries_rejected_and_missing_peers() -> None:
    """A call without a decision is a JSON line with the image, the error, and what became
    of the peers asked."""
    out = io.StringIO()
    printer = _Printer(out, json_lines=True, names=["a.png"], classes=CLASS_NAMES)
    printer.error("a.png", "no decision: quorum not met", [("p1", "bad_signature")], ["p2"])
    assert json.loads(out.getvalue()) == {
        "image": "a.png",
        "error": "no decision: quorum not met",
        "rejected": [{"peer": "p1", "reason": "bad_signature"}],
        "missing": ["p2"],
    }


def test_missing_manifest_exits_2(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest path that does not exist is a usage error, not a traceback."""
    assert main([str(image), "--manifest", str(tmp_path / "none.json")]) == 2
    assert "model manifest not found" in capsys.readouterr().err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm.classify", *args]


def test_no_peers_exits_1_within_wait(
    image: Path, tiny_manifest: Manifest, swarm_name: str
) -> None:
    """Nobody answers on mDNS: exit 1 with one clear line soon after --wait, no traceback."""
    started = time.monotonic()
    flags = ["--interface", "127.0.0.1", "--swarm", swarm_name, "--wait", "0.5"]
    done = subprocess.run(
        _cli(str(image), *flags, "--manifest", str(tiny_manifest.path)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""  # the table's failures go to stderr only
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{PROG}no peers found: no peer of swarm '{swarm_name}'")
    assert "127.0.0.1" in lines[-1]
    assert elapsed < 0.5 + 15  # interpreter start and imports, then --wait, then close


async def test_classifies_with_peers_found_on_mdns(
    tiny_manifest: Manifest, image: Path, swarm_name: str
) -> None:
    """End to end: peers announced on 127.0.0.1 are found; JSON lines and the table."""
    async with AsyncExitStack() as stack:
        registrations = []
        for spec in tiny_manifest.variants:
            identity = Identity.generate()
            server = await stack.enter_async_context(
                link_peer(tiny_manifest, spec, swarm_name, identity)
            )
            disc = await stack.enter_async_context(
                Discovery(
                    PeerTable(swarm_name),
                    interfaces=LOOPBACK,
                    timings=Timings(mdns_register_timeout_s=10.0),
                )
            )
            announcement = Announcement(
                swarm=swarm_name,
                peer_id=identity.peer_id,
                public_key=identity.public_key,
                role="peer",
                port=server.port,
                variant=spec.name,
                model_sha256=spec.sha256,
                macs=spec.macs,
                accuracy=spec.val_accuracy,
                family=tiny_manifest.family_id,
            )
            registrations.append(disc.register(announcement))
        await asyncio.gather(*registrations)
        common = ["--interface", "127.0.0.1", "--swarm", swarm_name, "--wait", "20"]
        common += ["--manifest", str(tiny_manifest.path)]

        out, err, code = await _run(str(image), str(image), "--json", *common)
        assert code == 0, err
        docs = [json.loads(line) for line in out.splitlines()]
        assert len(docs) == 2
        doc = docs[0]
        assert (doc["image"], doc["class"], doc["label"], doc["rule"]) == (
            str(image),
            1,
            "Trouser",
            "robust",
        )
        # Two agreeing confident replies already decide: the third may be skipped.
        assert len(doc["replies"]) >= 2
        assert len(doc["replies"]) + len(doc["skipped"]) == 3
        assert {r["variant"] for r in doc["replies"]} <= {"T1", "T2", "T3"}
        assert doc["rejected"] == doc["missing"] == []

        # An unreadable image among readable ones: its error line, in its place; exit 1.
        garbage = image.parent / "garbage.png"
        garbage.write_bytes(b"not an image")
        out, err, code = await _run(str(garbage), str(image), "--json", *common)
        assert code == 1, err
        bad, good = (json.loads(line) for line in out.splitlines())
        assert bad["image"] == str(garbage)
        assert "unsupported input" in bad["error"]
        assert (bad["rejected"], bad["missing"]) == ([], [])
        assert (good["image"], good["label"]) == (str(image), "Trouser")
        assert f"{PROG}" in err and str(garbage) in err

        out, err, code = await _run(str(image), "--variants", "T2,T3", *common)
        assert code == 0, err
        header, row = out.splitlines()
        assert header.split() == [
            "IMAGE", "CLASS", "CONF", "F", "LATENCY", "REPLIES", "REJECTED", "MISSING", "SKIPPED",
            "DISSENT",
        ]  # fmt: skip
        assert row.startswith(str(image))
        assert row.index("Trouser") == header.index("CLASS")
        assert row.endswith("  -")  # every peer said Trouser: nobody dissented


async def _run(*args: str) -> tuple[str, str, int]:
    proc = await asyncio.create_subprocess_exec(
        *_cli(*args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return out.decode(), err.decode(), proc.returncode
