"""Backbones: the digits CNN's receptive field against its closed form."""

from __future__ import annotations

import pytest
import torch

from fastssl.backbones import DigitsCNN, build_backbone


def _support(net: DigitsCNN, row: int, col: int) -> torch.Tensor:
    """(16, 16) bool: input pixels whose value reaches cell (row, col) of the final feature map."""
    net = net.double().eval()
    total = torch.zeros(16, 16, dtype=torch.float64)
    for seed in range(4):  # several inputs, so a ReLU that happens to be off does not hide a pixel
        x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        x.requires_grad_(True)
        net.body(x)[0, :, row, col].sum().backward()
        total += x.grad.abs().sum(dim=(0, 1))
    return total > 0


@pytest.mark.parametrize(("extra_blocks", "half_width"), [(0, 4), (1, 8)])
@pytest.mark.parametrize(("row", "col"), [(0, 0), (1, 2)])
def test_digits_cnn_receptive_field(extra_blocks, half_width, row, col):
    # Three 3x3 convs at strides 1, 2, 2 (padding 1): cell (i, j) is centred on pixel (4i, 4j) and sees ±4 px;
    # every extra stride-1 conv on the stride-4 map adds ±4 px more.
    torch.manual_seed(0)
    support = _support(DigitsCNN(width=4, extra_blocks=extra_blocks), row, col)
    pixels = torch.arange(16)
    rows = (pixels - 4 * row).abs() <= half_width
    cols = (pixels - 4 * col).abs() <= half_width
    assert torch.equal(support, rows[:, None] & cols[None, :])


def test_digits_cnn_archs():
    for arch, width, convs in [
        ("digits_cnn", 32, 3),
        ("digits_cnn_small", 16, 3),
        ("digits_cnn4", 32, 4),
        ("digits_cnn4_small", 16, 4),
    ]:
        net = build_backbone(arch)
        assert net.feature_dim == 4 * width
        assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == convs
        assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 4 * width)
