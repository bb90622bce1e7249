"""Rebuild trainable PyTorch members from a family's ONNX files (needs PyTorch and onnx).

The export folds every BatchNorm into its convolution, so an ONNX Conv carries the fused
weight and bias. ``model_from_onnx`` builds the member's architecture (from its manifest
entry), loads the fused weights into the convolutions in graph order and sets every
BatchNorm to identity plus the fused bias (weight 1, running mean 0, running variance 1,
eps 0). Such a BatchNorm must stay in eval mode while training (``train_mode``); it then
adds a trainable per-channel scale and bias and the exported graph folds it back exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from variants.plans import Recipe

PARITY_TOL = 1e-4  # max difference of probabilities and log-probabilities to onnxruntime
LOG_FLOOR = 1e-12  # log-probabilities are compared where both probabilities exceed this


class WarmStartError(RuntimeError):
    """A family or ONNX file that cannot be loaded as a trainable member; says why."""


@dataclass(frozen=True)
class Member:
    """One model of a shipped family: its manifest entry, file and recipe."""

    name: str  # the manifest's name (reference, V1, ...)
    candidate: str  # the recipe's candidate name (unique within the family)
    path: Path
    entry: dict[str, Any]
    recipe: Recipe


def read_family(folder: Path) -> tuple[dict[str, Any], list[Member]]:
    """The manifest of the family in ``folder`` and its models (reference first)."""
    path = folder / "manifest.json"
    if not path.exists():
        raise WarmStartError(
            f"{path} not found: --family must be a family folder (manifest.json + models/), "
            "e.g. variants/families/fashion-mnist"
        )
    manifest = json.loads(path.read_text())
    members = []
    for e in manifest.get("models", []):
        file = folder / e["file"]
        if not file.exists():
            raise WarmStartError(f"{file} ({e['name']}) listed in {path} is missing")
        raw = e.get("recipe", {})
        cand = str(raw.get("candidate") or e["name"].lower())
        recipe = Recipe(
            name=cand,
            width=float(e["width"]),
            resolution=int(e["resolution"]),
            depth=float(e.get("depth", 1.0)),
            seed=int(raw.get("seed", 0)),
            distill=bool(raw.get("distilled", False)),
            weight_decay=float(raw.get("weight_decay", Recipe.weight_decay)),
            batch=int(raw.get("batch", Recipe.batch)),
            label_smoothing=float(raw.get("label_smoothing", 0.0)),
            erase_p=float(raw.get("erase_p", Recipe.erase_p)),
        )
        members.append(Member(e["name"], cand, file, e, recipe))
    if not any(m.entry["role"] == "reference" for m in members):
        raise WarmStartError(f"{path} lists no reference model")
    if len({m.candidate for m in members}) != len(members):
        raise WarmStartError(f"{path}: two models share a candidate name")
    members.sort(key=lambda m: m.entry["role"] != "reference")
    return manifest, members


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_conv(i: int, node: Any, conv: Any, w: np.ndarray, path: Path) -> None:
    want = tuple(conv.weight.shape)
    got = {
        "weight shape": (tuple(w.shape), want),
        "group": (int(_attr(node, "group", 1)), conv.groups),
        "strides": (tuple(_attr(node, "strides", [1, 1])), tuple(conv.stride)),
        "pads": (tuple(_attr(node, "pads", [0, 0, 0, 0]))[:2], tuple(conv.padding)),
    }
    for what, (onnx_v, torch_v) in got.items():
        if onnx_v != torch_v:
            raise WarmStartError(
                f"{path}: convolution {i} ({node.name or node.output[0]}) has {what} {onnx_v}, "
                f"the architecture from the manifest needs {torch_v}: the manifest's width, "
                "resolution or depth does not describe this file; fix the manifest entry"
            )


def model_from_onnx(
    path: Path, recipe: Recipe, fmt: Any = None, num_classes: int = 10, check: bool = True
) -> Any:
    """The member ``recipe`` describes, with the weights of the ONNX file at ``path``.

    ``check``: compare the rebuilt model's probabilities with onnxruntime's on a few
    random inputs and fail if they differ by more than ``PARITY_TOL``.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    from variants.models import Arch, ConvBNAct, MobileNetV2

    if not path.exists():
        raise WarmStartError(f"ONNX file {path} is missing")
    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:
        raise WarmStartError(f"{path} is not a readable ONNX file ({exc})") from exc
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    convs_onnx = [n for n in graph.node if n.op_type == "Conv"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    arch = Arch(width=recipe.width, resolution=recipe.resolution, depth=recipe.depth)
    model = MobileNetV2(arch, num_classes, fmt)
    blocks = [m for m in model.modules() if isinstance(m, ConvBNAct)]
    if len(convs_onnx) != len(blocks) or len(gemms) != 1:
        raise WarmStartError(
            f"{path} has {len(convs_onnx)} convolutions and {len(gemms)} Gemm, the architecture "
            f"from the manifest (width {recipe.width}, resolution {recipe.resolution}, depth "
            f"{recipe.depth}) has {len(blocks)} and 1: the manifest entry does not describe "
            "this file; fix it or point --family at the folder the file came from"
        )
    with torch.no_grad():
        for i, (node, block) in enumerate(zip(convs_onnx, blocks, strict=True)):
            conv, bn = block[0], block[1]
            if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
                raise WarmStartError(
                    f"{path}: convolution {i} has no constant fused weight and bias; "
                    "not a file written by variants.export"
                )
            w, b = inits[node.input[1]], inits[node.input[2]]
            _check_conv(i, node, conv, w, path)
            conv.weight.copy_(torch.from_numpy(w.copy()))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b.copy()))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.eps = 0.0
        gemm = gemms[0]
        lin = model.classifier[1]
        w = inits.get(gemm.input[1])
        b = inits.get(gemm.input[2]) if len(gemm.input) > 2 else None
        if w is not None and not _attr(gemm, "transB", 0):
            w = w.T
        if w is None or b is None or w.shape != tuple(lin.weight.shape):
            raise WarmStartError(
                f"{path}: the classifier's weight is {None if w is None else w.shape}, the "
                f"architecture needs {tuple(lin.weight.shape)}; fix the manifest entry"
            )
        lin.weight.copy_(torch.from_numpy(np.array(w)))
        lin.bias.copy_(torch.from_numpy(b.copy()))
    model.eval()
    if check:
        diff = onnx_parity(model, path)
        if diff > PARITY_TOL:
            raise WarmStartError(
                f"{path}: the rebuilt model's probabilities differ from onnxruntime's by "
                f"{diff:.2e} (> {PARITY_TOL}): the manifest's resolution or input format does "
                "not match the file; fix the manifest entry"
            )
    return model


def onnx_parity(model: Any, path: Path, n: int = 8) -> float:
    """Max difference of probabilities and log-probabilities between ``model`` and
    onnxruntime on random inputs."""
    import torch

    from variants import runtime

    fmt = model.fmt
    x = np.random.default_rng(0).random((n, fmt.channels, fmt.size, fmt.size), dtype=np.float32)
    try:
        got = runtime.predict(path, x)
    except Exception as exc:
        raise WarmStartError(
            f"onnxruntime cannot run {path} on the family's input ({exc})"
        ) from exc
    was = model.training
    model.eval()
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    model.train(was)
    if got.shape != want.shape:
        return float("inf")
    # Log-probabilities too (logits up to a row constant): near-uniform outputs of an
    # untrained model hide a mismatch in the probabilities.
    ok = (got > LOG_FLOOR) & (want > LOG_FLOOR)
    log_diff = np.abs(np.log(np.where(ok, got, 1)) - np.log(np.where(ok, want, 1))).max()
    return float(max(np.abs(got - want).max(), log_diff))


def train_mode(model: Any) -> Any:
    """Training mode with every BatchNorm kept in eval mode (frozen statistics)."""
    from torch import nn

    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


__all__ = [
    "Member",
    "WarmStartError",
    "model_from_onnx",
    "onnx_parity",
    "read_family",
    "train_mode",
]
