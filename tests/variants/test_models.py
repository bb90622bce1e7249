"""The MobileNetV2 family: shapes, parameter and MACs counts, the in-graph resize."""

from __future__ import annotations

import pytest

from tests.variants.conftest import needs_torch

pytestmark = needs_torch


def test_reference_counts_are_mobilenetv2_at_28x28() -> None:
    """The reference has MobileNetV2's 2.24M parameters and 72.9M MACs at 28x28."""
    from variants.models import Arch, MobileNetV2, count_macs, count_params

    ref = MobileNetV2(Arch())
    assert count_params(ref) == 2_236_106
    assert count_macs(ref) == 72_938_624


@pytest.mark.parametrize(("width", "res"), [(1.0, 28), (0.25, 28), (0.25, 14), (0.5, 16)])
def test_every_member_maps_canonical_input_to_ten_logits(width: float, res: int) -> None:
    """Every member takes (N, 1, 28, 28) whatever its resolution and returns (N, 10)."""
    import torch

    from variants.models import Arch, MobileNetV2

    model = MobileNetV2(Arch(width=width, resolution=res)).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_macs_fall_with_resolution_and_width() -> None:
    """Lower resolution and lower width each cost fewer MACs."""
    from variants.models import Arch, MobileNetV2, count_macs

    macs = [count_macs(MobileNetV2(Arch(width=0.25, resolution=r))) for r in (28, 20, 14)]
    assert macs == sorted(macs, reverse=True)
    assert count_macs(MobileNetV2(Arch(width=0.5, resolution=16))) > count_macs(
        MobileNetV2(Arch(width=0.25, resolution=16))
    )


@pytest.mark.parametrize("res", [12, 14, 20, 24])
def test_resize_matrices_match_torch_antialiased_bilinear(res: int) -> None:
    """The two-matmul resize equals torch's antialiased bilinear interpolation."""
    import torch
    import torch.nn.functional as F

    from variants.models import Preprocess

    x = torch.rand(4, 1, 28, 28)
    pre = Preprocess(res)
    got = torch.matmul(torch.matmul(pre.rows, x), pre.cols)
    want = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    assert (got - want).abs().max().item() < 1e-5


def test_bad_architecture_is_refused() -> None:
    """A resolution above the input size or a silly width is a clear error."""
    from variants.models import Arch, MobileNetV2

    with pytest.raises(ValueError, match="resolution"):
        MobileNetV2(Arch(resolution=32))
    with pytest.raises(ValueError, match="resolution"):
        Arch(resolution=2)
    with pytest.raises(ValueError, match="width"):
        Arch(width=0.0)


@pytest.mark.parametrize(("channels", "size", "classes"), [(3, 32, 5), (3, 64, 2), (1, 8, 10)])
def test_members_take_any_channels_size_and_classes(channels: int, size: int, classes: int) -> None:
    """A family of C channels, S pixels and N classes maps (B, C, S, S) to (B, N) at every
    member resolution, and counts MACs on that input."""
    import torch

    from variants.models import Arch, InputFormat, MobileNetV2, count_macs

    fmt = InputFormat(channels, size, (0.5,) * channels, (0.25,) * channels)
    for res in (size, max(5, size * 3 // 5)):
        model = MobileNetV2(Arch(width=0.25, resolution=res), classes, fmt).eval()
        with torch.no_grad():
            assert model(torch.rand(2, channels, size, size)).shape == (2, classes)
        assert count_macs(model) > 0


def test_normalisation_is_per_channel() -> None:
    """An RGB family normalises each channel with its own mean and std inside the graph."""
    import torch

    from variants.models import InputFormat, Preprocess

    pre = Preprocess(8, InputFormat(3, 8, (0.1, 0.2, 0.3), (0.5, 0.5, 0.25)))
    out = pre(torch.full((1, 3, 8, 8), 0.3))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.4, 0.2, 0.0]))
