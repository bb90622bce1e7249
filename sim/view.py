"""``python -m sim.view``: a local swarm with its live page, running until Ctrl-C.

    python -m sim.view [--images N] [--keep-dir DIR]

Starts one real ``python -m swarm.peer`` process per shipped variant on 127.0.0.1 (each
serves the page at ``GET /``). Once the peers see each other it
classifies ``--images`` held-out test images through the first peer's
``POST /v1/classify`` (every peer asked), so its page opens on a feed of decisions, then
prints the page's address and waits; a peer that exits meanwhile is reported and the others
go on. Ctrl-C (or SIGTERM) stops every process it started.
Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image

from sim.demo import INTERFACE, READY_TIMEOUT_S, _stop, _wait_ready
from variants import MANIFEST_PATH
from variants.data import DatasetError, load_split

DISCOVERY_S: Final = 30.0
HTTP_TIMEOUT_S: Final = 10.0
CLASSIFY_QUERY: Final = "?replicas=all&wave=all"  # every peer votes: the page shows them all


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
        return json.loads(resp.read())


def _classify(url: str, image: np.ndarray) -> dict[str, Any]:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    request = urllib.request.Request(
        url + CLASSIFY_QUERY, data=buf.getvalue(), headers={"Content-Type": "image/png"}
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return {"error": exc.read().decode("utf-8", "replace")[:300]}


def _wait_discovery(ports: list[int], count: int) -> None:
    deadline = time.monotonic() + DISCOVERY_S
    for port in ports:
        while len(_get(f"http://{INTERFACE}:{port}/v1/info")["peers"]) < count - 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the peers did not find each other in {DISCOVERY_S:.0f} s")
            time.sleep(0.2)


def _peer_argv(variant: str, swarm: str, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "swarm.peer",
        *("--variant", variant, "--interface", INTERFACE, "--port", "0"),
        *("--swarm", swarm, "--data-dir", str(data_dir), "--log-format", "json"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sim.view",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=8, help="held-out images to start with")
    p.add_argument("--keep-dir", type=Path, default=None, help="keep keys and logs here")
    args = p.parse_args(argv)
    if not 0 <= args.images <= 1000:
        p.error("--images must be between 0 and 1000")
    variants = [
        m["name"] for m in json.loads(MANIFEST_PATH.read_text())["models"] if m["role"] == "variant"
    ]
    try:
        test = load_split("test") if args.images else None
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    swarm = f"view-{secrets.token_hex(3)}"
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C
    with contextlib.ExitStack() as stack:
        work = args.keep_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        procs: list[subprocess.Popen[str]] = []
        stack.callback(_stop, procs)
        print(f"starting {len(variants)} peers on {INTERFACE} (swarm {swarm})", flush=True)
        for variant in variants:
            log = stack.enter_context((work / f"{variant}.log").open("w"))
            cmd = _peer_argv(variant, swarm, work / variant)
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True))
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            ready = [_wait_ready(proc, deadline) for proc in procs]
            ports = [int(event["port"]) for event in ready]
            _wait_discovery(ports, len(procs))
        except (RuntimeError, OSError, ValueError) as exc:
            print(f"error: {exc}; see the logs in {work}", file=sys.stderr)
            return 1
        for variant, event in zip(variants, ready, strict=True):
            page = f"http://{INTERFACE}:{event['port']}/"
            print(f"  {variant}: peer {event['peer_id']}  {page}", flush=True)
        first = f"http://{INTERFACE}:{ports[0]}/v1/classify"
        if test is not None:
            rng = np.random.default_rng(7)
            for i in rng.choice(len(test), size=args.images, replace=False):
                doc = _classify(first, test.images[i])
                print(f"  test image {i}: {doc.get('label', doc.get('error'))}", flush=True)
        print(f"\nthe page: http://{INTERFACE}:{ports[0]}/  (Ctrl-C stops the swarm)", flush=True)
        # A peer that exits (killed, say, to watch the page mark it) is reported, and the
        # rest keep running.
        exited: set[int] = set()
        try:
            while len(exited) < len(procs):
                for variant, proc in zip(variants, procs, strict=True):
                    if proc.poll() is not None and proc.pid not in exited:
                        exited.add(proc.pid)
                        print(f"  {variant} exited with status {proc.returncode}", flush=True)
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nstopping the swarm", flush=True)
            return 0
        print(f"error: every peer exited; see the logs in {work}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
