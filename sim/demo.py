"""The demo: a local swarm of peers, one per shipped variant, classifies held-out images.

    python -m sim.demo [--images N] [--rule robust] [--keep-dir DIR]

Starts one real ``python -m swarm.peer`` process per shipped variant on 127.0.0.1 (real
mDNS on loopback, real HTTP), waits for their ready lines, writes sample images from the
held-out test set as PNG files, classifies them with ``python -m swarm.classify --json``
(a requester that finds the peers itself, no configuration but the swarm name), prints a
table, and stops every peer, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from variants import CLASS_NAMES, MANIFEST_PATH
from variants.data import DatasetError, load_split

INTERFACE = "127.0.0.1"  # the demo never touches the machine's real interfaces
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def _wait_ready(proc: subprocess.Popen[str], deadline: float) -> dict[str, Any]:
    """Read the peer's stdout until its ready line (or fail with its stderr)."""
    out: IO[str] | None = proc.stdout
    assert out is not None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"peer exited with {proc.returncode}: {err.strip()[-500:]}")
        ready, _, _ = select.select([out], [], [], 0.2)
        if ready:
            line = out.readline()
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "ready":
                    return event
    raise RuntimeError(f"peer did not become ready within {READY_TIMEOUT_S:.0f} s")


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _sample(n: int, seed: int) -> list[tuple[int, np.ndarray, int]]:
    test = load_split("test")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(test), size=n, replace=False)
    return [(int(i), test.images[i], int(test.labels[i])) for i in sorted(idx)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sim.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=20, help="held-out test images (default 20)")
    p.add_argument(
        "--rule", default="robust", choices=["robust", "sum", "vote", "trimmed", "median"]
    )
    p.add_argument("--seed", type=int, default=7, help="which test images (default 7)")
    p.add_argument(
        "--keep-dir",
        type=Path,
        default=None,
        help="keep the images, peer keys and logs here instead of a temp folder",
    )
    args = p.parse_args(argv)
    if not 1 <= args.images <= 1000:
        p.error("--images must be between 1 and 1000")
    manifest = json.loads(MANIFEST_PATH.read_text())
    variants = [m["name"] for m in manifest["models"] if m["role"] == "variant"]
    try:
        samples = _sample(args.images, args.seed)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    swarm = f"demo-{secrets.token_hex(3)}"
    with contextlib.ExitStack() as stack:
        work = args.keep_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img, _ in samples:
            path = work / f"test{i:05d}.png"
            Image.fromarray(img, mode="L").save(path)
            paths.append(path)
        procs: list[subprocess.Popen[str]] = []
        stack.callback(_stop, procs)
        print(
            f"starting {len(variants)} peers on {INTERFACE} (swarm {swarm}): {', '.join(variants)}",
            flush=True,
        )
        for v in variants:
            log = (work / f"peer-{v}.log").open("w")
            stack.callback(log.close)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "swarm.peer",
                        "--variant",
                        v,
                        "--interface",
                        INTERFACE,
                        "--port",
                        "0",
                        "--swarm",
                        swarm,
                        "--data-dir",
                        str(work / f"peer-{v}"),
                        "--log-format",
                        "json",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            for v, proc in zip(variants, procs, strict=True):
                event = _wait_ready(proc, deadline)
                print(
                    f"  {v}: peer {event.get('peer_id', '?')} on port {event.get('port')}",
                    flush=True,
                )
        except RuntimeError as exc:
            print(f"error: {exc}; see the logs in {work}", file=sys.stderr)
            return 1
        t0 = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "swarm.classify",
                "--interface",
                INTERFACE,
                "--swarm",
                swarm,
                "--json",
                "--rule",
                args.rule,
                "--wait",
                "20",
                "--wait-peers",
                str(len(variants)),
                *map(str, paths),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        wall = time.monotonic() - t0
        results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or len(results) != len(paths):
            print(
                f"error: classify exited {done.returncode}: {done.stderr.strip()[-800:]}",
                file=sys.stderr,
            )
            return 1
    truth = {f"test{i:05d}.png": label for i, _, label in samples}
    rows = []
    correct = 0
    for r in results:
        name = Path(r["image"]).name
        ok = r["class"] == truth[name]
        correct += ok
        rows.append(
            (
                name,
                CLASS_NAMES[truth[name]],
                r["label"],
                f"{r['confidence']:.2f}",
                str(r["certified_f"]),
                f"{r['latency_ms']:.1f}",
                f"{len(r['replies'])}/{len(r['rejected'])}/{len(r['missing'])}"
                f"/{len(r.get('skipped', []))}",
                "yes" if ok else "NO",
            )
        )
    head = (
        "image",
        "true class",
        "swarm says",
        "conf",
        "cert f",
        "ms",
        "used/rej/miss/skip",
        "right",
    )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    lat = sorted(r["latency_ms"] for r in results)
    print(
        f"\n{correct}/{len(results)} right ({100 * correct / len(results):.0f}%) with rule "
        f"{args.rule}; median latency {lat[len(lat) // 2]:.1f} ms; "
        f"{len(results)} images in {wall:.1f} s including discovery. Peers stopped.\n"
        "used/rej/miss/skip: replies counted, rejected, missing, and skipped by early exit "
        "(the vote was already decided)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
