"""Projection and prediction heads, as the papers build them.

``mlp(in, [hidden..., out], bn)`` is Linear-(BN)-ReLU-...-Linear: MSF / ISD-plus feat→2·feat→feat/4 with BN, ReSSL's
head without BN, MoCo v2's feat→feat→128 without BN, BYOL's 4096→256 with BN. ``out_bn`` adds MoCo v3's BN without
affine parameters on the output (its projectors, and SDSSL's with a MoCo v3 base: Jang et al. 2023, Sec. 4.1).
"""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, dims: list[int], *, bn: bool, out_bn: bool = False) -> nn.Module:
    """Linear-(BN)-ReLU blocks for every hidden width in ``dims[:-1]``, then Linear to ``dims[-1]`` (followed by a BN
    without affine parameters if ``out_bn``; the Linear then has no bias, which that BN would cancel); [] = identity."""
    if not dims:
        return nn.Identity()
    layers: list[nn.Module] = []
    for hidden in dims[:-1]:
        layers += [nn.Linear(in_dim, hidden, bias=not bn)]
        layers += [nn.BatchNorm1d(hidden)] if bn else []
        layers += [nn.ReLU(inplace=True)]
        in_dim = hidden
    layers.append(nn.Linear(in_dim, dims[-1], bias=not out_bn))
    if out_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def head_out_dim(in_dim: int, dims: list[int]) -> int:
    return dims[-1] if dims else in_dim
