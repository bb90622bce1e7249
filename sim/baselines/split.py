"""Model parallelism's stages: the reference ONNX cut into consecutive pieces.

The reference is a chain of blocks (``features.0`` .. ``features.18``, then pooling and the
classifier); a cut after any of blocks 0-17 leaves one tensor crossing it. ``split`` picks
``n - 1`` such cuts that share the MACs as evenly as they can (a pipeline runs at the pace
of its slowest stage), writes each stage with ``onnx.utils.extract_model`` (stage i's
output is stage i+1's input), and ``check_chain`` runs the chain against the whole model.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
from onnx import utils

from variants import runtime

BLOCK: Final = re.compile(r"^/net/features/features\.(\d+)/")
LAST_CUTTABLE: Final = 17  # after block 18 the tensor is 1280 x 4 x 4: no cut worth having
CHAIN_TOL: Final = 1e-5


class SplitError(RuntimeError):
    """The model cannot be cut as asked; the message says why."""


@dataclass(frozen=True)
class Stage:
    """One stage file: what it reads, what it writes, what it costs."""

    index: int
    file: str
    input: str
    output: str
    macs: int
    params: int
    output_shape: list[int]  # per image


def _shapes(model: Any) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    out: dict[str, list[int]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = [1, *dims[1:]] if dims else []
    return out


def block_costs(model: Any) -> tuple[list[str], list[int], dict[str, list[int]]]:
    """Each block's boundary tensor (its last output) and MACs per image, in order;
    the pooling and classifier count with the last block."""
    shapes = _shapes(model)
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    boundary: dict[int, str] = {}
    macs: dict[int, int] = {}
    block = 0
    for node in model.graph.node:
        found = BLOCK.match(node.name)
        if found:
            block = int(found.group(1))
            boundary[block] = node.output[0]
        cost = 0
        if node.op_type == "Conv":
            w = inits[node.input[1]]
            out = shapes.get(node.output[0], [])
            cost = int(np.prod(out)) * int(np.prod(w[1:])) if out else 0
        elif node.op_type == "Gemm":
            cost = int(np.prod(inits[node.input[1]]))
        macs[block] = macs.get(block, 0) + cost
    blocks = sorted(boundary)
    return [boundary[b] for b in blocks], [macs.get(b, 0) for b in blocks], shapes


def balanced_cuts(macs: list[int], stages: int) -> list[int]:
    """Indices of the blocks after which to cut (at most LAST_CUTTABLE), so that each
    stage's MACs come as close as they can to an equal share (greedy on the running sum)."""
    if not 2 <= stages <= LAST_CUTTABLE + 1:
        raise SplitError(f"stages must be 2..{LAST_CUTTABLE + 1}, not {stages}")
    total = sum(macs)
    cum = np.cumsum(macs)
    cuts: list[int] = []
    for k in range(1, stages):
        want = total * k / stages
        lo = cuts[-1] + 1 if cuts else 0
        hi = LAST_CUTTABLE - (stages - 1 - k)
        best = min(range(lo, hi + 1), key=lambda b: abs(float(cum[b]) - want))
        cuts.append(best)
    return cuts


def split(reference: Path, stages: int, out: Path) -> list[Stage]:
    """Write ``stages`` stage files of ``reference`` into ``out``; returns their plan."""
    try:
        model = onnx.load(str(reference))
    except OSError as exc:
        raise SplitError(f"cannot read {reference}: {exc}") from exc
    names, macs, shapes = block_costs(model)
    if len(names) != LAST_CUTTABLE + 2:
        raise SplitError(f"{reference} has {len(names)} blocks; not the shipped reference")
    cuts = balanced_cuts(macs, stages)
    edges = ["input", *(names[c] for c in cuts), "probs"]
    bounds = [-1, *cuts, len(macs) - 1]
    out.mkdir(parents=True, exist_ok=True)
    plan = []
    for i in range(stages):
        path = out / f"stage{i + 1}of{stages}.onnx"
        utils.extract_model(str(reference), str(path), [edges[i]], [edges[i + 1]])
        piece = onnx.load(str(path))
        plan.append(
            Stage(
                index=i,
                file=path.name,
                input=edges[i],
                output=edges[i + 1],
                macs=sum(macs[bounds[i] + 1 : bounds[i + 1] + 1]),
                params=sum(int(np.prod(t.dims)) for t in piece.graph.initializer),
                output_shape=shapes[edges[i + 1]][1:],
            )
        )
    (out / f"stages{stages}.json").write_text(
        json.dumps([asdict(s) for s in plan], indent=1) + "\n"
    )
    return plan


def run_chain(folder: Path, plan: list[Stage], x: np.ndarray) -> np.ndarray:
    """The chain's output for ``x`` (N, 1, 28, 28), one stage after another."""
    for stage in plan:
        sess = runtime.session(folder / stage.file, threads=1)
        x = sess.run(None, {stage.input: x})[0]
    return x


def check_chain(reference: Path, folder: Path, plan: list[Stage], x: np.ndarray) -> float:
    """Largest difference between the chain's and the whole model's probabilities;
    raises SplitError above CHAIN_TOL."""
    whole = runtime.session(reference, threads=1).run(None, {"input": x})[0]
    diff = float(np.abs(run_chain(folder, plan, x) - whole).max())
    if diff > CHAIN_TOL:
        raise SplitError(f"the {len(plan)}-stage chain differs from the model by {diff:.2e}")
    return diff


def load_plan(folder: Path, stages: int) -> list[Stage]:
    raw = json.loads((folder / f"stages{stages}.json").read_text())
    return [Stage(**s) for s in raw]
