"""sensAI-style class-parallel sub-models: the reference's weights, channel-pruned per group.

sensAI (Wang et al., MLSys 2021) splits a trained network's classes into groups and prunes,
for each group, the channels that the group's images hardly use, then fine-tunes the pruned
network as a classifier of its group (its classes plus "other"). Here:

- ``reference_from_onnx`` rebuilds the shipped reference in PyTorch from its ONNX file
  (the exporter folded every BatchNorm into its convolution, so each BatchNorm becomes the
  identity plus the folded bias);
- ``channel_scores`` measures each prunable channel's mean activation on a group's images;
- ``prune`` keeps the most active fraction of the inverted residuals' expanded channels
  and of the last 1x1 convolution's channels (the residual widths stay: they are tied
  across blocks) and puts a group head on top.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from variants.models import Arch, ConvBNAct, InvertedResidual, MobileNetV2

BN_EPS = 1e-5


class PruneError(RuntimeError):
    """The reference cannot be loaded or pruned as asked; the message says why."""


def _initializers(path: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:  # type: ignore[attr-defined]
        raise PruneError(f"cannot read the reference ONNX file {path}: {exc}") from exc
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = []
    for node in graph.node:
        if node.op_type == "Conv":
            if len(node.input) != 3:
                raise PruneError(f"{path}: a Conv without a folded bias ({node.name})")
            convs.append((inits[node.input[1]], inits[node.input[2]]))
    return convs, inits


def reference_from_onnx(path: Path) -> MobileNetV2:
    """The reference MobileNetV2 (width 1.0, 28 px) with the weights of its ONNX file."""
    convs, inits = _initializers(path)
    model = MobileNetV2(Arch(width=1.0, resolution=28, depth=1.0))
    layers = [m for m in model.modules() if isinstance(m, ConvBNAct)]
    if len(layers) != len(convs):
        raise PruneError(
            f"{path} has {len(convs)} convolutions, the reference architecture "
            f"{len(layers)}: not the shipped reference"
        )
    with torch.no_grad():
        for layer, (weight, bias) in zip(layers, convs, strict=True):
            conv, bn = layer[0], layer[1]
            assert isinstance(conv, nn.Conv2d)
            assert isinstance(bn, nn.BatchNorm2d)
            if tuple(conv.weight.shape) != weight.shape:
                raise PruneError(f"{path}: weight {weight.shape} for a {conv} layer")
            conv.weight.copy_(torch.from_numpy(np.array(weight)))
            # BN(y) = (y - mean) / sqrt(var + eps) * gamma + beta with var = 1 - eps:
            # the identity plus the folded bias, and still a BatchNorm to fine-tune.
            bn.running_mean.zero_()  # type: ignore[union-attr]
            bn.running_var.fill_(1.0 - BN_EPS)  # type: ignore[union-attr]
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(np.array(bias)))
        head = model.classifier[1]
        assert isinstance(head, nn.Linear)
        head.weight.copy_(torch.from_numpy(np.array(inits["net.classifier.1.weight"])))
        head.bias.copy_(torch.from_numpy(np.array(inits["net.classifier.1.bias"])))
    return model.eval()


def _prunable(model: MobileNetV2) -> list[InvertedResidual]:
    return [m for m in model.features if isinstance(m, InvertedResidual) and len(m.block) == 3]


@dataclass(frozen=True)
class ChannelStats:
    """Per prunable layer: each channel's mean output on all images (what a removed
    channel is replaced by) and its standard deviation on the group's images."""

    mean: list[torch.Tensor]
    group_std: list[torch.Tensor]


def _moments(model: MobileNetV2, images: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
    """Per-channel E[x] and E[x^2] at every prunable tap: the expanded blocks' depthwise
    outputs (over images and positions), the last convolution's pooled output."""
    blocks = _prunable(model)
    taps: list[nn.Module] = [b.block[1] for b in blocks] + [model.features[-1]]
    first: list[torch.Tensor | None] = [None] * len(taps)
    second: list[torch.Tensor | None] = [None] * len(taps)
    pooled = len(taps) - 1

    def hook(i: int) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def record(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            x = out.mean(dim=(2, 3), keepdim=True) if i == pooled else out
            m1 = x.mean(dim=(2, 3)).sum(0)
            m2 = (x * x).mean(dim=(2, 3)).sum(0)
            p1, p2 = first[i], second[i]
            first[i] = m1 if p1 is None else p1 + m1
            second[i] = m2 if p2 is None else p2 + m2

        return record

    handles = [t.register_forward_hook(hook(i)) for i, t in enumerate(taps)]
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(images), 250):
                model(images[start : start + 250])
    finally:
        for h in handles:
            h.remove()
    n = len(images)
    return [f / n for f in first if f is not None], [s / n for s in second if s is not None]


def channel_stats(
    model: MobileNetV2, group_images: torch.Tensor, all_images: torch.Tensor
) -> ChannelStats:
    """The statistics that ``prune`` ranks and replaces channels by."""
    g1, g2 = _moments(model, group_images)
    a1, _ = _moments(model, all_images)
    std = [torch.sqrt(torch.clamp(s - m * m, min=0.0)) for m, s in zip(g1, g2, strict=True)]
    return ChannelStats(mean=a1, group_std=std)


def _slice_conv(layer: ConvBNAct, keep: torch.Tensor, *, out: bool, inp: bool) -> ConvBNAct:
    """A copy of ``layer`` with only the ``keep`` channels on its output and/or input."""
    conv, bn = layer[0], layer[1]
    assert isinstance(conv, nn.Conv2d)
    assert isinstance(bn, nn.BatchNorm2d)
    depthwise = conv.groups > 1
    cin = len(keep) if inp or depthwise else conv.in_channels
    cout = len(keep) if out else conv.out_channels
    new = ConvBNAct(
        cin,
        cout,
        kernel=conv.kernel_size[0],
        stride=conv.stride[0],
        groups=len(keep) if depthwise else 1,
        act=len(layer) == 3,
    )
    nconv, nbn = new[0], new[1]
    assert isinstance(nconv, nn.Conv2d)
    assert isinstance(nbn, nn.BatchNorm2d)
    with torch.no_grad():
        w = conv.weight
        if out:
            w = w[keep]
        if inp and not depthwise:
            w = w[:, keep]
        nconv.weight.copy_(w)
        if out:
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(nbn, name).copy_(getattr(bn, name)[keep])
        else:
            nbn.load_state_dict(bn.state_dict())
    return new


def _top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    count = max(8, round(len(scores) * fraction))
    return torch.sort(torch.topk(scores, min(count, len(scores))).indices).values


def prune(
    reference: MobileNetV2,
    stats: ChannelStats,
    keep: float,
    group: Sequence[int],
    calibration: torch.Tensor | None,
) -> MobileNetV2:
    """A copy of ``reference`` keeping the ``keep`` fraction of its prunable channels
    that vary most on the group's images (standard deviation times the norm of the
    weights that read the channel), with a head for ``group``'s classes plus "other".

    ``reference`` must come from ``with_reference_statistics``: after the cut (unless
    ``calibration`` is None: weights about to be loaded from a checkpoint), every
    BatchNorm re-estimates its statistics on ``calibration`` images, so each layer's
    output gets back the reference's mean and spread (cut all at once, the shifts
    compound layer after layer and the network collapses to one answer). The pooled
    features' removed channels are replaced by their mean in the head's bias. The head
    starts from the reference's rows for the group; "other" from the mean of the
    remaining rows, its bias raised by the log of how many classes it stands for.
    """
    if not 0.05 <= keep <= 1.0:
        raise PruneError(f"keep fraction {keep} outside 0.05..1.0")
    if not group or len(set(group)) != len(group) or not all(0 <= c < 10 for c in group):
        raise PruneError(f"group {list(group)} must be distinct classes in 0..9")
    model = copy.deepcopy(reference)
    blocks = _prunable(model)
    if len(stats.mean) != len(blocks) + 1:
        raise PruneError(f"statistics of {len(stats.mean)} layers, not {len(blocks) + 1}")
    for block, std in zip(blocks, stats.group_std, strict=False):
        expand, dw, project = block.block[0], block.block[1], block.block[2]
        assert isinstance(expand, ConvBNAct)
        assert isinstance(dw, ConvBNAct)
        assert isinstance(project, ConvBNAct)
        reader = project[0].weight[:, :, 0, 0].detach()  # (cout, hidden)
        idx = _top(std * reader.norm(dim=0), keep)
        block.block[0] = _slice_conv(expand, idx, out=True, inp=False)
        block.block[1] = _slice_conv(dw, idx, out=True, inp=True)
        block.block[2] = _slice_conv(project, idx, out=False, inp=True)
    with torch.no_grad():
        last = model.features[-1]
        old = model.classifier[1]
        assert isinstance(last, ConvBNAct)
        assert isinstance(old, nn.Linear)
        idx = _top(stats.group_std[-1] * old.weight[list(group)].norm(dim=0), keep)
        gone = _complement(idx, old.in_features)
        model.features[-1] = _slice_conv(last, idx, out=True, inp=False)
        bias = old.bias + old.weight[:, gone] @ stats.mean[-1][gone]
        rest = [c for c in range(10) if c not in group]
        head = nn.Linear(len(idx), len(group) + 1)
        w = old.weight[:, idx]
        head.weight.copy_(torch.cat([w[list(group)], w[rest].mean(dim=0, keepdim=True)]))
        other = bias[rest].mean() + float(np.log(max(1, len(rest))))
        head.bias.copy_(torch.cat([bias[list(group)], other.reshape(1)]))
    model.classifier[1] = head
    if calibration is not None:
        recalibrate(model, calibration)
    return model


def shape_only_stats(reference: MobileNetV2) -> ChannelStats:
    """Statistics of the right sizes and no content: ``prune`` with them builds the
    architecture of any pruned model of this keep fraction (to load a checkpoint into)."""
    sizes = [b.block[1][0].out_channels for b in _prunable(reference)]
    last = reference.features[-1][0].out_channels
    zeros = [torch.zeros(int(n)) for n in [*sizes, last]]
    return ChannelStats(mean=zeros, group_std=zeros)


def _batchnorms(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    return [
        (m[0], m[1])
        for m in model.modules()
        if isinstance(m, ConvBNAct)
        and isinstance(m[0], nn.Conv2d)
        and isinstance(m[1], nn.BatchNorm2d)
    ]


def with_reference_statistics(model: MobileNetV2, images: torch.Tensor) -> MobileNetV2:
    """Give every BatchNorm of a model fresh from ``reference_from_onnx`` the mean and
    variance of its convolution's output on ``images``, without changing the function:
    gamma = sqrt(var + eps) and beta = mean + bias undo the normalisation, so a later
    re-estimation of the statistics restores each layer's reference distribution."""
    layers = _batchnorms(model)
    moments: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        moments.append((out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3), unbiased=False)))

    handles = [conv.register_forward_hook(record) for conv, _ in layers]
    try:
        model.eval()
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for (_conv, bn), (mean, var) in zip(layers, moments, strict=True):
            bias = bn.bias.clone()
            bn.running_mean.copy_(mean)  # type: ignore[union-attr]
            bn.running_var.copy_(var)  # type: ignore[union-attr]
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mean + bias)
    return model


def recalibrate(model: nn.Module, images: torch.Tensor) -> None:
    """Re-estimate every BatchNorm's statistics on ``images`` (one pass, exact average)."""
    bns = [bn for _, bn in _batchnorms(model)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 256):
            model(images[start : start + 256])
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def _complement(idx: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[idx] = False
    return torch.nonzero(mask).flatten()
