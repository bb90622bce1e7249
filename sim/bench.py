"""``python -m sim.bench [--out DIR] [--quick]``: the swarm against its physical floor.

Writes ``DIR/bench.json`` and ``DIR/bench.md`` (also printed): the variants against the
reference model; classify's overhead over the floor with where its time goes; the fast
path, each change against its old behaviour put back in the same run; throughput under
concurrency against one batched process; scaling with peers; tails with stragglers.
Beside classify, in the overhead and throughput sections, runs the bare swarm
(``sim.benchmarks.bare``): the same models with no protocol around them, the least a
swarm of one process per variant costs on these cores.
Every figure is a median (p50) over many runs, with its p99; every ratio compares two
things measured in this run. ``--quick`` is the CI smoke run: the same JSON keys, a few
runs each, and the sections that need extra fleets of peers left ``null``.

Everything runs on 127.0.0.1: peers are ``python -m swarm.peer --interface 127.0.0.1``,
the requester browses mDNS on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

from sim.benchmarks import load, sections
from sim.benchmarks.bare import BareSwarm
from sim.benchmarks.fleet import BenchError, Fleet, requester
from sim.benchmarks.loadgen import LoadGens
from sim.benchmarks.measure import FloatArray, classify_loop, inputs, loopback_rtt, quantile
from sim.benchmarks.sections import Plan
from swarm import aio
from swarm.crypto.identity import Identity
from swarm.inference.engine import default_manifest_path, load_manifest
from swarm.log import configure_logging
from swarm.wire import codec as wire

DEFAULT_OUT: Final = Path("runs/bench")
# Five peers, one of each of the five cheapest variants (V1-V5); the largest of the shipped
# six, V6, sits out so that the numbers compare with the runs recorded before it existed.
VARIANTS: Final = ("V1", "V2", "V3", "V4", "V5")
# The peers' old behaviours, each put back alone (flags, environment) by the fast-path
# section: a 2 ms micro-batch wait for every lone input, every batch handed to the
# model's thread, the stock asyncio event loop, aiohttp serving the peer-to-peer POSTs.
OLD_LOOP_ENV: Final = {aio.ENV: "asyncio"}
OLD_PEERS: Final[dict[str, tuple[list[str], dict[str, str]]]] = {
    "old_batch_wait_2ms": (["--batch-wait-ms", "2"], {}),
    "old_engine_thread": (["--inline-max-ms", "0"], {}),
    "old_asyncio_loop": ([], OLD_LOOP_ENV),
    "old_aiohttp_server": (["--http", "aiohttp"], {}),
}
OLD_PEER_FLAGS: Final = [flag for flags, _ in OLD_PEERS.values() for flag in flags]
SECTIONS: Final = ("variants", "overhead", "fast_path", "throughput", "scaling", "tails")


async def run(plan: Plan, workdir: Path) -> dict[str, Any]:
    """Every section, in one run; the peers are stopped whatever happens."""
    started = time.monotonic()
    manifest = load_manifest(default_manifest_path())
    tensors = inputs(256)
    out: dict[str, Any] = {"meta": _meta(plan)}
    out["variants"] = sections.variants(manifest, plan)
    latencies = {n: m["latency_ms"]["p50"] for n, m in out["variants"]["models"].items()}
    rtt = await loopback_rtt(plan.rtt_runs)
    fanout = await loopback_rtt(
        plan.rtt_runs // 2, servers=len(VARIANTS), body_bytes=_request_bytes(tensors[0])
    )
    async with contextlib.AsyncExitStack() as stack:
        main = await stack.enter_async_context(Fleet(workdir / "main"))
        # Peers with one old behaviour each put back, then all of them, then no batching.
        extra = [] if plan.quick else [*OLD_PEERS.values(), ([*OLD_PEER_FLAGS], OLD_LOOP_ENV)]
        extra += [] if plan.quick else [(["--no-batching"], {})]
        others = [
            await stack.enter_async_context(Fleet(workdir / "x", extra=flags, env=env))
            for flags, env in extra
        ]
        await asyncio.gather(*(f.start(VARIANTS) for f in [main, *others]))
        req = await stack.enter_async_context(requester(main, manifest, peers=len(VARIANTS)))
        bare = await stack.enter_async_context(BareSwarm(VARIANTS))
        await bare.loop(tensors, count=20)  # connections warm, models warm
        side = [
            await stack.enter_async_context(requester(f, manifest, peers=len(VARIANTS)))
            for f in others
        ]
        for r in (req, *side):
            await classify_loop(r, tensors, count=20)  # connections open, caches warm
        gens = None
        if plan.requesters >= 2:
            gens = await stack.enter_async_context(
                LoadGens(main.swarm, plan.requesters, workdir / "gens", peers=len(VARIANTS))
            )

        async def floor_again(chosen: Sequence[str]) -> float:
            again = sections.model_latencies(manifest, chosen, plan.model_runs)
            rtt_again = quantile(await loopback_rtt(plan.rtt_runs), 0.5)
            return sections.floor_ms(again, chosen, rtt_again)

        out["overhead"] = await sections.overhead(
            req, tensors, latencies, rtt, fanout, plan, main.peers, bare, floor_again
        )
        old_peers = dict(zip([*OLD_PEERS, "old_all"], side, strict=False))
        out["fast_path"] = await sections.fast_path(req, tensors, plan, old_peers=old_peers)
        chosen = out["overhead"]["variants"]
        out["throughput"] = await load.throughput(
            tensors,
            plan,
            lambda: load.batched_floor(manifest, chosen, plan.batch_runs),
            (req, main.peers),
            (side[-1], others[-1].peers) if side else None,
            bare,
            None if gens is None else (gens, main.peers),
        )
        await bare.aclose()  # its processes idle from here, but need not stay
        if gens is not None:  # their requesters would keep probing the peers that follow
            await gens.aclose()
        for fleet in others:  # their CPU is not part of what follows
            await fleet.aclose()
        levels = [await load.scaling_level(main, req, tensors, plan.scale[0], plan)]
        stragglers = [p for p in main.peers if p.ready["variant"] == "V3"]
        await req.table.wait_for(len(main.peers), load.SEE_TIMEOUT_S)
        hedge_after = max(0.005, 2 * out["overhead"]["classify_ms"]["p50"] / 1000)
        out["tails"] = await load.tails(req, tensors, stragglers, plan, hedge_after)
        for n in plan.scale[1:]:
            levels.append(await load.scaling_level(main, req, tensors, n, plan))
        out["scaling"] = load.scaling_summary(levels)
    out["targets"] = targets(out)
    out["meta"]["seconds"] = round(time.monotonic() - started, 1)
    out["meta"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


async def _until_signal(work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run ``work``; SIGINT or SIGTERM cancel it, so its peers are still stopped."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await task


def _request_bytes(tensor: FloatArray) -> int:
    request = wire.build_request(Identity.generate(), swarm="bench", tensor=tensor, deadline_ms=1)
    return len(wire.encode_request(request))


def _meta(plan: Plan) -> dict[str, Any]:
    return {
        "quick": plan.quick,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cores": sections.CORES,
        "python": platform.python_version(),
        # Every process of the run (peers, requesters, bare workers) runs on this loop.
        "event_loop": aio.loop_name(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "units": "ms unless named otherwise; p50 = median, p99 = 99th percentile",
    }


def targets(out: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: each with its measured value and whether it is met."""
    ov = out["overhead"]
    c32 = out["throughput"]["levels"]["batching_on"].get("32")
    c32_wave = out["throughput"]["levels"][f"batching_on_wave{sections.WAVE}"].get("32")
    c32_gens = out["throughput"]["levels"][load.REQUESTERS].get("32")
    scale = out["scaling"]
    by_n = {lv["peers"]: lv for lv in scale["levels"]}
    p50_40 = by_n[40]["classify_ms"]["p50"] / by_n[5]["classify_ms"]["p50"] if 40 in by_n else None

    def item(value: float | None, limit: float, *, below: bool = True) -> dict[str, Any]:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return {"value": None, "limit": limit, "met": None}
        met = value <= limit if below else value >= limit
        return {"value": round(value, 4), "limit": limit, "met": met}

    see20 = by_n[20]["all_see_all_s"] if 20 in by_n else None
    return {
        "overhead_ratio_p50": item(ov["overhead_ratio"], 1.5),
        "overhead_ratio_p50_no_early_exit": item(ov["overhead_ratio_no_early_exit"], 1.5),
        "overhead_ratio_p50_wave": item(ov["overhead_ratio_wave"], 1.5),
        "throughput_c32_vs_floor": item(c32["vs_floor"] if c32 else None, 0.5, below=False),
        "throughput_c32_wave_vs_floor": item(
            c32_wave["vs_floor"] if c32_wave else None, 0.5, below=False
        ),
        # The same load shared among several requester processes (null below 8 cores).
        "throughput_c32_requesters_vs_floor": item(
            c32_gens["vs_floor"] if c32_gens else None, 0.5, below=False
        ),
        "crypto_share": item(ov["crypto_share"], 0.05),
        "all_see_all_at_20_s": item(see20, 3.0),
        "p50_40_vs_5_peers": item(p50_40, 2.0),
    }


# --- the report ----------------------------------------------------------------------


def markdown(out: dict[str, Any]) -> str:
    """The human table of a run."""
    meta = out["meta"]
    lines = [f"# sim.bench ({'quick' if meta['quick'] else 'full'})", ""]
    lines += [
        f"{meta['cores']} cores, Python {meta['python']} on {meta['event_loop']}, "
        f"load {meta['loadavg_before']}",
        "",
    ]
    lines += [
        "## Variants (1 thread)",
        "",
        "| model | p50 ms | p99 ms | x ref | batch32/s | x ref |",
    ]
    lines += ["|---|---|---|---|---|---|"]
    for name, m in out["variants"]["models"].items():
        lat = m["latency_ms"]
        lines.append(
            f"| {name} | {lat['p50']} | {lat['p99']} | {m.get('latency_vs_reference')} "
            f"| {m['throughput_per_s']} | {m.get('throughput_vs_reference')} |"
        )
    ov = out["overhead"]
    lines += ["", "## Overhead: classify with 5 peers vs the floor", ""]
    lines += ["| | p50 ms | p99 ms | / floor |", "|---|---|---|---|"]
    lines.append(
        f"| floor (mean of {ov['floor_before_ms']} before and {ov['floor_after_ms']} after "
        f"the calls) | {ov['floor_ms']} | | 1 |"
    )
    lines.append(f"| loopback RTT | {ov['rtt_ms']['p50']} | {ov['rtt_ms']['p99']} | |")
    fan = ov["unsigned_fanout_ms"]
    lines.append(
        f"| unsigned fan-out x5, no model | {fan['p50']} | {fan['p99']} "
        f"| {ov['unsigned_fanout_vs_floor']} |"
    )
    bare = ov["bare_swarm_ms"]
    lines.append(
        f"| bare swarm x5: the same models, raw TCP, no protocol | {bare['p50']} "
        f"| {bare['p99']} | {ov['bare_swarm_vs_floor']} |"
    )
    lines.append(
        "| bare swarm + the crypto on a call's path + one robust decide "
        f"({ov['decide_p50_ms']} ms), all else free | {ov['bare_plus_mandated_ms']} | "
        f"| {ov['bare_plus_mandated_vs_floor']} |"
    )
    for key, label, r in (
        ("classify_ms", "classify", ov["overhead_ratio"]),
        ("classify_no_early_exit_ms", "no early exit", ov["overhead_ratio_no_early_exit"]),
        ("classify_wave_ms", f"wave of {ov['wave']}", ov["overhead_ratio_wave"]),
    ):
        s = ov[key]
        lines.append(f"| {label} | {s['p50']} | {s['p99']} | {r} |")
    for key, label in (("cpu_ms_per_call", "all at once"), ("cpu_ms_per_call_wave", "wave")):
        cpu = ov[key]
        lines.append(
            f"\nCPU per call ({label}): requester {cpu['requester']} ms, "
            f"peers {cpu['peers_total']} ms, of which their models ran {cpu['peers_models']} ms "
            f"({cpu['peers_models_cpu']} ms of the models' own CPU)"
        )
    lines.append(
        f"\nThe models' CPU per call, run as the swarm runs them, is {ov['models_cpu_vs_alone']}x "
        f"the sum of their latencies alone (the floor's); with it the floor would be "
        f"{ov['floor_with_swarm_models_cpu_ms']} ms."
    )
    lines += ["", "| stage | p50 ms | share |", "|---|---|---|"]
    for stage, ms in ov["breakdown_p50_ms"].items():
        lines.append(f"| {stage} | {ms} | {ov['breakdown_share_of_p50'][stage]} |")
    lines.append(
        f"\nSigning and verifying: {ov['crypto_share']} of p50 on a call's path (the "
        f"requester's sign and verify above, one peer's check and signature); "
        f"{ov['crypto_share_with_late_checks']} with the signature checks of the replies "
        f"sampled after their calls ({ov['late_check_ms_per_call']} ms per call on average)."
    )
    lines += ["", "## Fast path (old behaviour put back, same run)", ""]
    lines += ["| config | p50 ms | p99 ms | p50 / current |", "|---|---|---|---|"]
    for name, row in out["fast_path"].items():
        if name == "vote_cost_ms":
            continue
        if row is None:
            lines.append(f"| {name} | - | - | - |")
        else:
            s = row["classify_ms"]
            lines.append(f"| {name} | {s['p50']} | {s['p99']} | {row['p50_vs_current']} |")
    vc = out["fast_path"]["vote_cost_ms"]
    lines.append(
        f"\nvoting per call ({vc['calls']} calls' replies): numpy {vc['old_p50']} ms, "
        f"class by class {vc['class_by_class_p50']} ms, now {vc['new_p50']} ms"
    )
    tp = out["throughput"]
    low, high = tp["floor_per_s_range"]
    lines += ["", f"## Throughput (floor {tp['floor']['per_s']}/s; {low} to {high} in the section)"]
    lines += ["", "Each row against the floor measured just before and after it (their mean)."]
    lines += ["The table is measured in rounds; each row shows its median round, and every"]
    lines += ["round's ratio to its floor under 'rounds'.", ""]
    lines += ["CPU per call (ms): the requester's (and of it its garbage collector's), the"]
    lines += ["peers' (or bare workers') in all, and of that the models' own.", ""]
    if tp["requesters"] >= 2:
        lines += [f"{load.REQUESTERS}: the load shared among {tp['requesters']} requester"]
        lines += ["processes (their CPU per call summed).", ""]
    lines += [
        "| batching | concurrency | /s | floor /s | / floor | rounds | p50 ms | p99 ms | batch "
        "| requester cpu | of it gc | peers cpu | models cpu |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, rows in tp["levels"].items():
        for level, row in rows.items():
            if row is None:
                lines.append(f"| {mode} | {level} |" + " - |" * 11)
                continue
            lat = row["latency_ms"]
            rounds = ", ".join(str(r) for r in row["rounds_vs_floor"])
            lines.append(
                f"| {mode} | {level} | {row['per_s']} | {row['floor_per_s']} | {row['vs_floor']} "
                f"| {rounds} | {lat['p50']} | {lat['p99']} | {row['mean_batch']} "
                f"| {row['requester_cpu_ms_per_call']} | {row['requester_gc_ms_per_call']} "
                f"| {row['peers_cpu_ms_per_call']} "
                f"| {row['models_cpu_ms_per_call']} |"
            )
    lines += ["", "## Scaling", ""]
    lines += ["| peers | all see all s | join s | p50 ms | p99 ms | cpu ms | failed |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for lv in out["scaling"]["levels"]:
        s = lv["classify_ms"]
        lines.append(
            f"| {lv['peers']} | {lv['all_see_all_s']} | {lv['join_seen_by_all_s']} | {s['p50']} "
            f"| {s['p99']} | {lv['requester_cpu_ms_per_call']} | {lv['failures']} |"
        )
    tl = out["tails"]
    lines += ["", f"## Tails (hedge after {tl['hedge_after_ms']} ms)", ""]
    lines += ["| config | p50 ms | p99 ms | failed |", "|---|---|---|---|"]
    for name in ("no_straggler_ms", "plain", "hedging", "early_exit", "hedging_and_early_exit"):
        lines.append(f"| {name} | {tl[name]['p50']} | {tl[name]['p99']} | {tl['failures'][name]} |")
    lines += ["", "## Targets", "", "| target | value | limit | met |", "|---|---|---|---|"]
    for name, t in out["targets"].items():
        lines.append(f"| {name} | {t['value']} | {t['limit']} | {t['met']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: seconds, not minutes")
    args = parser.parse_args(argv)
    plan = Plan.ci() if args.quick else Plan(quick=False)
    args.out.mkdir(parents=True, exist_ok=True)
    # As the classify CLI: warnings only, so the requester here logs what a user's would.
    configure_logging("json", "warning")
    aio.serving_gc()  # as a peer's, whose requester this one stands for
    with tempfile.TemporaryDirectory(prefix="vswarm-bench-") as tmp:
        try:
            out = aio.run(_until_signal(run(plan, Path(tmp))))
        except BenchError as exc:  # a peer or worker that failed: said, not a traceback
            sys.stderr.write(f"sim.bench: error: {exc}\n")
            return 1
    (args.out / "bench.json").write_text(json.dumps(out, indent=2) + "\n")
    text = markdown(out)
    (args.out / "bench.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
