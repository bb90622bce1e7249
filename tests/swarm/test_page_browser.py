"""The page in a real browser: headless Chromium (Debian's) driven by Playwright, against a
real local swarm of ``python -m swarm.peer`` processes on 127.0.0.1.

Chromium is started with every background service off (no network is reachable from
here, and none is needed): all its traffic goes to the peers on 127.0.0.1. ``make test``
installs Debian's ``chromium`` when it is missing; the test is skipped only where it
cannot be found. With ``VSWARM_PAGE_SHOTS=DIR`` the test also saves screenshots of the
page at a desktop and a phone width there (the README's, under sim/results/page/).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sim.screenshots import CHROMIUM, CHROMIUM_ARGS
from tests.swarm.procs import (
    PeerProcess,
    ProcessGroup,
    http,
    load_models,
    process_group,
    wait_until,
    write_samples,
)

pytestmark = pytest.mark.slow

DISCOVERY_S = 30.0
UI_TIMEOUT_MS = 15_000  # a page element appearing: seconds at most on a busy 2-core box
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
DROP_JS = """([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type: "image/png" }));
  const drop = document.getElementById("drop");
  for (const type of ["dragenter", "dragover", "drop"]) {
    const init = { dataTransfer: data, bubbles: true, cancelable: true };
    drop.dispatchEvent(new DragEvent(type, init));
  }
}"""


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium, or a skip that says what is missing."""
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS)
        )
        yield chromium
        chromium.close()


def png_of(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.load(path), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def seen_by(peer: PeerProcess) -> set[str]:
    status, body = http("GET", peer.url("/v1/info"))
    assert status == 200, body
    return {p["peer_id"] for p in body["peers"]}


def start_swarm(group: ProcessGroup, flags: list[str], variants: list[str]) -> list[PeerProcess]:
    name = f"ui-{uuid.uuid4().hex[:12]}"
    peers = [group.start_peer(v, swarm=name, extra=flags) for v in variants]
    for peer in peers:
        assert peer.wait_ready()["ui"] is True
    for peer in peers:
        others = {p.peer_id for p in peers} - {peer.peer_id}
        wait_until(
            lambda peer=peer, others=others: others <= seen_by(peer),
            timeout=DISCOVERY_S,
            what=f"{peer.name} to see the others",
        )
    return peers


def drop(page: Any, image: bytes, name: str) -> None:
    page.evaluate(DROP_JS, [base64.b64encode(image).decode("ascii"), name])


def shoot(page: Any, name: str) -> None:
    folder = os.environ.get("VSWARM_PAGE_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def test_page_shows_the_swarm_classifies_a_drop_and_marks_a_dead_peer(
    browser: Any, tmp_path: Path
) -> None:
    """Loads without console errors, lists every peer, classifies a dropped held-out test
    image with per-peer bars and the decision, shows a bad upload's API error, and marks
    a peer killed with SIGKILL as missing and then suspected within seconds."""
    models = load_models(tmp_path / "models")
    (tmp_path / "samples").mkdir()
    samples, labels = write_samples(tmp_path / "samples", count=12)
    classes = models.manifest.class_names
    with process_group(tmp_path / "procs") as group:
        peers = start_swarm(group, models.flags, models.by_accuracy()[:3])
        host, victim = peers[0], peers[2]
        console: list[str] = []
        page = browser.new_page(viewport=DESKTOP)
        page.on(
            "console",
            lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.goto(host.url("/"))

        page.wait_for_selector("#status[data-state=live]")
        for peer in peers:
            page.wait_for_selector(f"#peers tr[data-peer='{peer.peer_id}'][data-state=healthy]")
        assert page.locator("#peers tr").count() == len(peers)
        assert page.locator("#me").inner_text().count(host.variant) == 1

        drop(page, png_of(samples[0]), "held-out.png")
        result = page.wait_for_selector("#result .decision")
        label = result.query_selector(".label").inner_text()
        assert label in classes
        bars = page.locator("#result .reply .bar")
        assert bars.count() >= 2 * 2  # at least two replies, each its top-2
        assert page.locator("#result .reply").first.get_attribute("data-peer") in {
            p.peer_id for p in peers
        }
        # The same decision arrives in the live feed, with the input's thumbnail.
        entry = page.wait_for_selector(f"#feed .decision[data-label='{label}']")
        assert entry.query_selector("img.thumb").get_attribute("src").startswith("data:image/png")
        assert console == [], console
        if models.trained:  # the shipped family is right on most inputs; this one is easy
            correct = [classes[int(y)] for y in labels]
            assert label == correct[0] or page.locator("#result .dissent").count() > 0
        shoot(page, "desktop")
        phone = browser.new_page(viewport=PHONE)
        phone.goto(host.url("/"))
        phone.wait_for_selector("#feed .decision")
        phone.wait_for_selector(f"#peers tr[data-peer='{victim.peer_id}']")
        shoot(phone, "phone")
        phone.close()

        # A bad upload: the classify route's own clear error, shown on the page.
        garbage = tmp_path / "garbage.png"
        garbage.write_bytes(b"this is not an image")
        page.set_input_files("#file", str(garbage))
        error = page.wait_for_selector("#error:not([hidden])")
        assert "malformed_image" in error.inner_text()
        assert ".npy file" in error.inner_text()
        assert not [c for c in console if not c.startswith("error: Failed to load resource")]

        # A peer dies without a goodbye: the next calls find it missing, and the page
        # shows it backed off, then suspected.
        victim.stop(signal.SIGKILL)
        row = f"#peers tr[data-peer='{victim.peer_id}']"
        # Three failures in a row, each after the backoff of the one before (1 s, then 2 s):
        # a few seconds of calls, more on a busy machine; bounded at 30 s.
        give_up = time.monotonic() + 30.0
        i = 0
        while not page.locator(f"{row}[data-state=suspected]").count():
            assert time.monotonic() < give_up, "the killed peer was never shown suspected"
            i += 1
            drop(page, png_of(samples[1 + (i - 1) % (len(samples) - 1)]), f"after-kill-{i}.png")
            page.wait_for_selector(f"#feed li[data-seq='{i + 1}']")
            page.wait_for_timeout(700)
        page.wait_for_selector(f"{row}[data-state=suspected]", timeout=5_000)
        assert page.locator(f"#feed .missing .chip[data-peer='{victim.peer_id}']").count() >= 1
        shoot(page, "desktop-suspected")
        assert not [c for c in console if c.startswith("pageerror")]
        page.close()


def test_peer_with_ui_off_serves_no_page(tmp_path: Path) -> None:
    """``python -m swarm.peer --ui off``: its ready line says so, the page's routes answer
    404, and the API is served as before."""
    models = load_models(tmp_path / "models")
    with process_group(tmp_path / "procs") as group:
        peer = group.start_peer(
            models.by_accuracy()[0],
            swarm=f"ui-{uuid.uuid4().hex[:12]}",
            extra=[*models.flags, "--ui", "off"],
        )
        assert peer.wait_ready()["ui"] is False
        for path in ("/", "/ui/state", "/ui/events"):
            status, body = http("GET", peer.url(path))
            assert status == 404, body
            assert body["error"] == "not_found"
        status, body = http("GET", peer.url("/healthz"))
        assert (status, body["status"]) == (200, "ok")
