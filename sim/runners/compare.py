"""``python -m sim.run compare``: variant, model and class parallelism, measured side by side.

Each approach runs as a swarm of real processes on 127.0.0.1 (one process per device, one
inference thread each) and classifies the same held-out test images (the first
``--images`` of t10k):

1. healthy, one call at a time: accuracy, answered fraction, p50/p99, and the bytes that
   crossed the devices' sockets per image (``sim.baselines.meter``);
2. healthy, ``--concurrency`` calls in flight: throughput;
3. one device crashed (SIGKILL), then a second one: accuracy, answered fraction and which
   classes the live devices can still answer (``--crash-images`` each).

Writes ``report.json``, ``report.md`` and plots into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from sim.baselines import compare_report, split
from sim.baselines.meter import SocketMeter
from sim.baselines.setups import ChainSwarm, GroupSwarm, Swarm, VariantSwarm
from sim.procs import Cluster, SimError
from sim.runners.common import percentile
from swarm import aio
from swarm.inference.manifest import load_manifest
from swarm.log import configure_logging
from variants import MANIFEST_PATH
from variants.data import load_split
from variants.sensai import SUBNETS_DIR

log = structlog.get_logger("sim.runners.compare")

APPROACHES: Final = ("variant", "model", "class")
DEFAULT_SIZES: Final = {"variant": (2, 5), "model": (2, 3, 4, 5), "class": (2, 5, 10)}


def summarize(rows: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    answered = [r for r in rows if r["pred"] is not None]
    latencies = [r["latency_ms"] for r in answered]
    correct = sum(1 for r in answered if r["pred"] == r["label"])
    seen = {r["label"] for r in rows}
    right = {r["label"] for r in answered if r["pred"] == r["label"]}
    return {
        "images": len(rows),
        "accuracy": round(correct / len(rows), 4) if rows else None,
        "answered": round(len(answered) / len(rows), 4) if rows else None,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": round(max((r["latency_ms"] for r in rows), default=0.0), 1),
        "throughput": round(len(answered) / wall_s, 1) if wall_s > 0 else None,
        "classes_right": sorted(right),
        "classes_never_right": sorted(seen - right),
        "errors": sorted({str(r["error"])[:80] for r in rows if r.get("error")})[:3],
    }


def _reference() -> Path:
    manifest = json.loads(MANIFEST_PATH.read_text())
    ref = next(m for m in manifest["models"] if m.get("role") == "reference")
    return MANIFEST_PATH.parent / str(ref["file"])


def build_swarms(cluster: Cluster, args: argparse.Namespace, out: Path) -> list[Swarm]:
    """Every swarm the options ask for (stage files are cut and checked here)."""
    swarms: list[Swarm] = []
    sizes = args.sizes
    if "variant" in args.approaches:
        names = [v.name for v in load_manifest().variants]
        for n in sizes["variant"]:
            if n > len(names):
                raise SimError(f"variant n={n}: the family has {len(names)} variants")
            swarms.append(VariantSwarm(cluster, f"vp{n}", names[:n], args.concurrency))
    if "model" in args.approaches:
        folder = out / "stages"
        probe = load_split("test").as_float()[-64:]
        for n in sizes["model"]:
            plan = split.split(_reference(), n, folder)
            diff = split.check_chain(_reference(), folder, plan, probe)
            log.info("compare_stages", stages=n, max_diff=diff)
            swarms.append(ChainSwarm(cluster, f"mp{n}", folder, plan))
    if "class" in args.approaches:
        path = args.subnets / "manifest.json"
        if not path.exists():
            raise SimError(f"no sub-models at {path}: run python -m variants.sensai first")
        groupings = {len(g["groups"]): g for g in json.loads(path.read_text())["groupings"]}
        for n in sizes["class"]:
            if n not in groupings:
                raise SimError(f"class n={n}: {path} has groupings of {sorted(groupings)}")
            swarms.append(GroupSwarm(cluster, f"cp{n}", args.subnets, groupings[n]))
    return swarms


async def measure(
    swarm: Swarm, args: argparse.Namespace, data: Any, rng: random.Random
) -> list[dict[str, Any]]:
    """Every phase of one swarm; returns one row per phase."""
    images, labels = data
    base = {"approach": swarm.approach, "devices": swarm.size, "swarm": swarm.label}
    healthy = list(range(args.images))
    rows = []
    started = time.monotonic()
    await swarm.start()
    log.info("compare_started", swarm=swarm.label, seconds=round(time.monotonic() - started, 1))
    try:
        await swarm.classify(
            images, labels, healthy[: min(10, len(healthy))], 1, args.deadline_ms
        )  # warm-up
        meter = SocketMeter(swarm.ports())
        await meter.start()
        t0 = time.monotonic()
        got = await swarm.classify(images, labels, healthy, 1, args.deadline_ms)
        wall = time.monotonic() - t0
        into, out = await meter.stop()
        rows.append(
            {
                **base,
                "phase": "healthy",
                "crashed": 0,
                **summarize(got, wall),
                "bytes_per_image": round((into + out) / max(1, len(got))),
                "bytes_in_per_image": round(into / max(1, len(got))),
                "bytes_out_per_image": round(out / max(1, len(got))),
                "answerable": list(swarm.answerable()),
                # The crash phases drive the first --crash-images images: the healthy
                # accuracy on those same images is what they compare with.
                "accuracy_on_crash_images": summarize(
                    [r for r in got if r["i"] < args.crash_images], 1.0
                )["accuracy"],
            }
        )
        if args.concurrency > 1:
            burst = list(range(args.throughput_images))
            t0 = time.monotonic()
            got = await swarm.classify(images, labels, burst, args.concurrency, args.deadline_ms)
            rows.append(
                {
                    **base,
                    "phase": f"concurrency {args.concurrency}",
                    "crashed": 0,
                    **summarize(got, time.monotonic() - t0),
                    "answerable": list(swarm.answerable()),
                }
            )
        crash = list(range(args.crash_images))
        order = rng.sample(swarm.names, len(swarm.names))
        for k in (1, 2):
            if k >= swarm.size + 1:
                break
            await swarm.kill(order[k - 1])
            t0 = time.monotonic()
            got = await swarm.classify(images, labels, crash, 1, args.deadline_ms)
            rows.append(
                {
                    **base,
                    "phase": f"{k} crashed",
                    "crashed": k,
                    "killed": sorted(swarm.dead),
                    **summarize(got, time.monotonic() - t0),
                    "answerable": list(swarm.answerable()),
                }
            )
    finally:
        await swarm.stop()
    for row in rows:
        log.info("compare_row", swarm=row["swarm"], phase=row["phase"], accuracy=row["accuracy"])
    return rows


async def run(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    """Run every swarm in turn on one cluster; write and return the report."""
    out: Path = args.out
    test = load_split("test")
    if args.images > len(test) or args.crash_images > args.images:
        raise SimError("--images must fit t10k and --crash-images must not exceed --images")
    data = (test.images, test.labels)
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    started = time.time()
    async with Cluster(out, use_netns=False) as cluster:
        for swarm in build_swarms(cluster, args, out):
            if progress:
                print(f"compare: {swarm.label}", flush=True)
            rows += await measure(swarm, args, data, rng)
    report = {
        "scenario": "compare",
        "kind": "compare",
        "images": args.images,
        "crash_images": args.crash_images,
        "throughput_images": args.throughput_images,
        "concurrency": args.concurrency,
        "deadline_ms": args.deadline_ms,
        "seed": args.seed,
        "network": "loopback",
        "seconds": round(time.time() - started, 1),
        "models": compare_report.model_table(args.subnets, out / "stages"),
        "results": rows,
    }
    compare_report.write(report, out)
    return report


def _sizes(text: str) -> dict[str, tuple[int, ...]]:
    sizes = dict(DEFAULT_SIZES)
    if not text:
        return sizes
    for part in text.split(";"):
        name, _, values = part.partition("=")
        if name not in APPROACHES or not values:
            raise argparse.ArgumentTypeError(
                f"--sizes wants 'approach=n,n;...' with approaches {APPROACHES}, got {part!r}"
            )
        try:
            sizes[name] = tuple(int(v) for v in values.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--sizes: {values!r} is not a list of ints") from None
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sim.run compare", description=__doc__.split("\n")[0]
    )
    p.add_argument("--approaches", default=",".join(APPROACHES), help="comma-separated subset")
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=DEFAULT_SIZES,
        help="devices per swarm, e.g. 'variant=2,5;model=2,3;class=2' (defaults: "
        + "; ".join(f"{k}={','.join(map(str, v))}" for k, v in DEFAULT_SIZES.items())
        + ")",
    )
    p.add_argument("--images", type=int, default=300, help="held-out test images, healthy")
    p.add_argument("--crash-images", type=int, default=100, help="images per crash phase")
    p.add_argument("--throughput-images", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=4, help="calls in flight for throughput")
    p.add_argument("--deadline-ms", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="which devices crash")
    p.add_argument("--subnets", type=Path, default=SUBNETS_DIR, help="sensAI sub-models folder")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--log-level", default="warning")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sim.run compare``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging("console", args.log_level)
    args.approaches = [a for a in args.approaches.split(",") if a]
    bad = [a for a in args.approaches if a not in APPROACHES]
    if bad or not args.approaches:
        parser.error(f"--approaches: unknown {bad or 'none given'}; choose from {APPROACHES}")
    for name in ("images", "crash_images", "throughput_images", "concurrency", "deadline_ms"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(n < 1 for sizes in args.sizes.values() for n in sizes):
        parser.error("--sizes: every swarm needs at least one device")
    args.out = (
        args.out or Path("runs") / "sim" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    try:
        aio.run(run(args))
    except (SimError, split.SplitError, OSError) as exc:
        sys.stderr.write(f"python -m sim.run compare: failed: {exc}\n")
        return 1
    except asyncio.CancelledError:
        sys.stderr.write("interrupted: every process was stopped\n")
        return 130
    print((args.out / "report.md").read_text())
    print(f"report: {args.out / 'report.json'}")
    return 0
