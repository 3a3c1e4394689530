"""BYOL loss as a module (Grill et al., NeurIPS 2020, arXiv:2006.07733)."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.functional.byol import byol_loss


class BYOLLoss(nn.Module):
    """mean(2 − 2·cos(online, target)); symmetrize by calling with the views swapped and adding.

    Shape:
        online, target: (N, D) → scalar.
    """

    def forward(self, online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return byol_loss(online, target)
