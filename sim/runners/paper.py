"""``paper``: the Variant Parallelism results, measured through the swarm.

- Accuracy against total MACs for combinations of variants: each combination is one
  ``Policy(variants=...)`` of the requester, rule ``sum`` (the paper's), on the same
  held-out images. ``subsets``: ``all`` (every non-empty subset) or ``loo`` (each variant
  alone, the full ensemble, and each leave-one-out).
- Leave-one-out: the full ensemble with each variant left out.
- Response time: each variant and the reference model, measured in this run with
  onnxruntime (1 thread, batch 1, median of ``latency_runs`` runs on test images), plus
  each variant's latency through the swarm; speedup, MACs gain and params gain against
  the reference.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from typing import Any

import numpy as np
import onnxruntime as ort

from sim.procs import Cluster
from sim.runners.common import Report, start_swarm, stream, summarize, target
from sim.scenario import Scenario
from swarm.inference.manifest import ModelSpec, load_manifest
from variants.data import load_split


def measure_local(spec: ModelSpec, runs: int) -> float:
    """Median batch-1 latency (ms) of ``spec`` in onnxruntime with one thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(spec.file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    xs = load_split("test").as_float()[:runs]
    for x in xs[:20]:
        session.run(None, {name: x[None]})
    times = []
    for x in xs:
        started = time.perf_counter()
        session.run(None, {name: np.ascontiguousarray(x[None])})
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def combinations(names: list[str], mode: str) -> list[tuple[str, ...]]:
    if mode == "all":
        return [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]
    loo = [tuple(n for n in names if n != out) for out in names]
    return [(n,) for n in names] + [tuple(names)] + loo


async def run(cluster: Cluster, scenario: Scenario, progress: Any = None) -> Report:
    manifest = load_manifest()
    procs, (driver,) = await start_swarm(cluster, scenario)
    served = sorted({str(p.ready.get("variant")) for p in procs.values()})
    combos = combinations(served, str(scenario.params.get("subsets", "all")))
    if progress is not None:
        progress.reset(total=len(combos) * scenario.images)
    results = []
    by_combo: dict[tuple[str, ...], dict[str, Any]] = {}
    for combo in combos:
        if combo in by_combo:
            continue
        cmd = {
            "cmd": "classify",
            "indices": list(range(scenario.images)),
            "rule": "sum",
            "deadline_ms": scenario.deadline_ms,
            "variants": list(combo),
        }
        events, _, _ = await stream(cluster, driver, cmd, progress=progress)
        row = summarize(
            events,
            rule="sum",
            f=0,
            attack="none",
            variants="+".join(combo),
            macs=sum(manifest.get(v).macs for v in combo),
        )
        by_combo[combo] = row
        results.append(row)
    full = by_combo.get(tuple(served))
    runs = int(scenario.params.get("latency_runs", 200))
    reference = next(m for m in manifest.models if m.role == "reference")
    ref_ms = await asyncio.to_thread(measure_local, reference, runs)
    timing = [
        {
            "model": "reference",
            "local_ms": round(ref_ms, 4),
            "swarm_p50_ms": None,
            "speedup": 1.0,
            "macs_gain": 1.0,
            "params_gain": 1.0,
            "accuracy": reference.test_accuracy,
        }
    ]
    for name in served:
        spec = manifest.get(name)
        local = await asyncio.to_thread(measure_local, spec, runs)
        alone = by_combo.get((name,), {})
        timing.append(
            {
                "model": name,
                "local_ms": round(local, 4),
                "swarm_p50_ms": alone.get("p50_ms"),
                "speedup": round(ref_ms / local, 2),
                "macs_gain": round(reference.macs / spec.macs, 2),
                "params_gain": round(reference.params / spec.params, 2),
                "accuracy": alone.get("accuracy"),
            }
        )
    loo = [
        {
            "left_out": out,
            "accuracy": by_combo[c]["accuracy"],
            "drop": None if full is None else round(full["accuracy"] - by_combo[c]["accuracy"], 6),
        }
        for out in served
        if (c := tuple(n for n in served if n != out)) in by_combo
    ]
    clean = None if full is None else full["accuracy"]
    targets = []
    if full is not None:
        best_single = max(by_combo[(n,)]["accuracy"] for n in served if (n,) in by_combo)
        targets.append(
            target(
                "the full ensemble beats every single variant",
                full["accuracy"] > best_single,
                f"ensemble {full['accuracy']:.4f}, best single {best_single:.4f}",
            )
        )
    return Report(
        scenario.name,
        scenario.kind,
        len(procs),
        scenario.images,
        clean,
        results,
        extra={
            "combinations": [
                {"variants": r["variants"], "macs": r["macs"], "accuracy": r["accuracy"]}
                for r in results
            ],
            "leave_one_out": loo,
            "response_time": timing,
        },
        targets=targets,
    )
