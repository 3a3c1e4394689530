"""Backbones shared by training and evaluation: torchvision ResNets (optionally with the CIFAR stem), timm ViTs, and
tiny CPU models for the offline digits data. Every backbone returns pooled (N, feature_dim) features."""

from __future__ import annotations

import math

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


def sincos_position_embedding_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(1, grid_h·grid_w, dim) fixed 2-D sine-cosine position embedding of MoCo v3's ViT (Chen et al. 2021).

    Patch (i, j), in row-major order, gets [sin(i·ω), cos(i·ω), sin(j·ω), cos(j·ω)] with the dim/4 frequencies
    ω_f = temperature^(-f / (dim/4)), f = 0 … dim/4 − 1.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32), indexing="ij"
    )
    angle_i = rows.flatten()[:, None] * omega[None]
    angle_j = cols.flatten()[:, None] * omega[None]
    return torch.cat([angle_i.sin(), angle_i.cos(), angle_j.sin(), angle_j.cos()], dim=1)[None]


def use_mocov3_stem(vit: nn.Module) -> None:
    """MoCo v3's ViT stem (Chen et al. 2021), as SDSSL uses it (Jang et al. 2023, Sec. 4.1), in place on a timm ViT.

    The position embedding becomes the fixed 2-D sin-cos one (zero for the class token). The patch projection is
    re-drawn uniform in ±sqrt(6 / (3·p_h·p_w + width)) and frozen, which MoCo v3 found to stabilise training. Both stay
    parameters (without gradient), so checkpoints keep timm's layout and evaluation loads them as usual.
    """
    grid_h, grid_w = vit.patch_embed.grid_size
    prefix = vit.num_prefix_tokens if not getattr(vit, "no_embed_class", False) else 0
    if vit.pos_embed is None or vit.pos_embed.shape[1] != prefix + grid_h * grid_w:
        raise ValueError("model.vit_mocov3: this timm ViT has no per-patch position embedding to replace")
    table = sincos_position_embedding_2d(grid_h, grid_w, vit.embed_dim)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6.0 / float(proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] + vit.embed_dim))
    with torch.no_grad():
        vit.pos_embed.copy_(torch.cat([torch.zeros(1, prefix, vit.embed_dim), table], dim=1))
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)
    vit.pos_embed.requires_grad_(False)
    proj.requires_grad_(False)


def build_backbone(arch: str, *, cifar_stem: bool = False, vit_mocov3: bool = False) -> nn.Module:
    """A backbone whose forward returns (N, feature_dim) features; ``feature_dim`` is an attribute.

    ``vit_mocov3`` gives a ViT MoCo v3's stem (:func:`use_mocov3_stem`).
    """
    if vit_mocov3:
        backbone = build_backbone(arch, cifar_stem=cifar_stem)
        if not isinstance(backbone, ViTBackbone):
            raise ValueError(f"model.vit_mocov3: MoCo v3's ViT stem needs a ViT, not {arch!r}")
        use_mocov3_stem(backbone.vit)
        return backbone
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
