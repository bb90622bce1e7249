"""The MobileNetV2 family for C-channel, SxS input and N classes (needs PyTorch).

The reference is MobileNetV2 at width 1.0. At resolutions up to 32 it takes CIFAR-style
strides (a stride-1 stem, the second stage at stride 1) so a 28x28 image keeps enough
resolution: 28 -> 14 -> 7 -> 4; up to 64 the stem strides 2, above that ImageNet's
strides apply. Variants shrink the width multiplier, the input resolution (an
antialiased bilinear resize inside the model) and optionally the depth, following the
Variant Parallelism paper's seed table: one small width at several input resolutions.

Every member of a family takes the family's input (N, C, S, S), pixel / 255; the resize
and the normalisation are part of the graph, so the exported ONNX files share one
interface. The defaults are Fashion-MNIST's: 1 channel, 28x28, ten classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Fashion-MNIST training-set pixel statistics (of pixel / 255).
MEAN = 0.2860
STD = 0.3530
INPUT_SIZE = 28
NUM_CLASSES = 10

# (expansion t, channels c, repeats n, stride s) of MobileNetV2 (Sandler et al. 2018,
# table 2) with the first two strides set to 1 for small (<= 32 px) input.
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
CIFAR_MAX = 32  # up to this resolution: stride-1 stem and second stage (total /8)
STEM2_MAX = 64  # up to this: a stride-2 stem (total /16); above: ImageNet's /32


@dataclass(frozen=True)
class Arch:
    """What makes one member of the family: width, input resolution, depth."""

    width: float = 1.0
    resolution: int = INPUT_SIZE
    depth: float = 1.0
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if not 0.05 <= self.width <= 2.0:
            raise ValueError(f"width {self.width} outside 0.05..2.0")
        if not 4 <= self.resolution <= 512:
            raise ValueError(f"resolution {self.resolution} outside 4..512")
        if not 0.1 <= self.depth <= 1.0:
            raise ValueError(f"depth {self.depth} outside 0.1..1.0")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without losing more than 10%."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if out < 0.9 * value:
        out += divisor
    return out


def resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """The (size_out, size_in) matrix of torch's antialiased bilinear resize along one axis.

    ONNX opset 17 has no antialiased Resize; a separable resize is two matrix products,
    which export exactly. The matrix is read off torch's own kernel applied to a basis.
    """
    basis = torch.eye(size_in, dtype=torch.float64).reshape(size_in, 1, 1, size_in)
    out = F.interpolate(
        basis, size=(1, size_out), mode="bilinear", antialias=True, align_corners=False
    )
    return out.reshape(size_in, size_out).T.contiguous().float()


@dataclass(frozen=True)
class InputFormat:
    """What the family's graphs take: channels, side, and the pixel statistics."""

    channels: int = 1
    size: int = INPUT_SIZE
    mean: tuple[float, ...] = (MEAN,)
    std: tuple[float, ...] = (STD,)

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} value(s) each")


class Preprocess(nn.Module):
    """Resize (antialiased bilinear, as two matrix products) and normalise."""

    def __init__(self, resolution: int, fmt: InputFormat | None = None) -> None:
        super().__init__()
        fmt = fmt or InputFormat()
        self.resolution = resolution
        self.size = fmt.size
        self.register_buffer("rows", resize_matrix(fmt.size, resolution), persistent=False)
        self.register_buffer(
            "cols", resize_matrix(fmt.size, resolution).T.contiguous(), persistent=False
        )
        # One channel keeps scalar constants: the shipped graphs were exported that way.
        self.scalar = fmt.channels == 1
        self.mean0, self.std0 = fmt.mean[0], fmt.std[0]
        shape = (1, fmt.channels, 1, 1)
        self.register_buffer("mean", torch.tensor(fmt.mean).reshape(shape), persistent=False)
        self.register_buffer("std", torch.tensor(fmt.std).reshape(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resolution != self.size:
            x = torch.matmul(torch.matmul(self.rows, x), self.cols)
        if self.scalar:
            return (x - self.mean0) / self.std0
        return (x - self.mean) / self.std


class ConvBNAct(nn.Sequential):
    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, kernel=1))
        layers += [
            ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
            ConvBNAct(hidden, cout, kernel=1, act=False),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


def strides(resolution: int) -> tuple[int, int]:
    """(stem stride, second-stage stride) for a member working at ``resolution``."""
    if resolution <= CIFAR_MAX:
        return 1, 1
    if resolution <= STEM2_MAX:
        return 2, 1
    return 2, 2


class MobileNetV2(nn.Module):
    """MobileNetV2 for (N, C, S, S) input in [0, 1]; returns logits (N, num_classes)."""

    def __init__(
        self, arch: Arch, num_classes: int = NUM_CLASSES, fmt: InputFormat | None = None
    ) -> None:
        super().__init__()
        self.fmt = fmt or InputFormat()
        if arch.resolution > self.fmt.size:
            raise ValueError(
                f"resolution {arch.resolution} above the family's input size {self.fmt.size}"
            )
        self.arch = arch
        self.pre = Preprocess(arch.resolution, self.fmt)
        cin = make_divisible(32 * arch.width)
        # Torchvision's rule: the last layer keeps 1280 channels below width 1.0.
        last = make_divisible(1280 * max(1.0, arch.width))
        stem, second = strides(arch.resolution)
        layers: list[nn.Module] = [ConvBNAct(self.fmt.channels, cin, stride=stem)]
        for stage, (t, c, n, s) in enumerate(SETTINGS):
            cout = make_divisible(c * arch.width)
            repeats = max(1, math.ceil(n * arch.depth))
            stride = second if stage == 1 else s
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBNAct(cin, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(arch.dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.pre(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


class WithSoftmax(nn.Module):
    """The shipped graph: canonical input in, class probabilities out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: MobileNetV2) -> int:
    """Multiply-accumulates for one image: convolutions, the classifier and the resize."""
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = m.kernel_size
        macs += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: tuple[torch.Tensor], _out: torch.Tensor) -> None:
        nonlocal macs
        macs += m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, model.fmt.channels, model.fmt.size, model.fmt.size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    r, size = model.arch.resolution, model.fmt.size
    if r != size:
        macs += model.fmt.channels * (r * size * size + r * r * size)
    return macs
