"""Backbones shared by training and evaluation: torchvision ResNets (optionally with the CIFAR stem), timm ViTs, and
tiny CPU models for the offline digits data. Every backbone returns pooled (N, feature_dim) features."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 16x16 inputs (the CPU demo): 3x3 conv-BN-ReLU blocks, global average pooled.

    The default is 3 convs, 3→w→2w→4w channels at strides 1, 2, 2: a cell of the final 4x4 map sees 9x9 px.
    ``extra_blocks`` appends stride-1 4w→4w convs on that map, each widening the view by 8 px (17x17 with one), so
    that one feature sees a whole 8-12 px digit wherever it sits on the canvas.
    """

    def __init__(self, width: int = 32, extra_blocks: int = 0) -> None:
        super().__init__()
        self.feature_dim = 4 * width

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        layers = block(3, width, 1) + block(width, 2 * width, 2) + block(2 * width, 4 * width, 2)
        for _ in range(extra_blocks):
            layers += block(4 * width, 4 * width, 1)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class ViTBackbone(nn.Module):
    """A timm ViT returning the final CLS token, or every block's CLS through the shared final norm (SDSSL)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.feature_dim = vit.embed_dim
        self.depth = len(vit.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def forward_layers(self, x: torch.Tensor) -> torch.Tensor:
        """(L, N, D): the CLS token after each of the L blocks, each through the final norm."""
        _, prefix = zip(
            *self.vit.forward_intermediates(
                x, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
            ),
            strict=True,
        )
        return torch.stack([p[:, 0] for p in prefix])


def build_backbone(arch: str, *, cifar_stem: bool = False) -> nn.Module:
    """A backbone whose forward returns (N, feature_dim) features; ``feature_dim`` is an attribute."""
    if arch == "digits_cnn":
        return DigitsCNN()
    if arch == "digits_cnn_small":
        return DigitsCNN(width=16)
    if arch == "digits_cnn4_small":
        return DigitsCNN(width=16, extra_blocks=1)
    if arch == "digits_cnn4":
        return DigitsCNN(width=32, extra_blocks=1)
    if arch == "vit_tiny_digits":
        from timm.models.vision_transformer import VisionTransformer

        return ViTBackbone(
            VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=0)
        )
    if arch.startswith("resnet"):
        import torchvision

        if not hasattr(torchvision.models, arch):
            raise ValueError(f"model.arch: torchvision has no {arch!r}")
        net = getattr(torchvision.models, arch)(weights=None)
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        net.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        return net
    if arch.startswith("vit"):
        import timm

        if arch not in timm.list_models():
            raise ValueError(f"model.arch: timm has no {arch!r}")
        return ViTBackbone(timm.create_model(arch, pretrained=False, num_classes=0))
    raise ValueError(f"model.arch: unknown architecture {arch!r}")
