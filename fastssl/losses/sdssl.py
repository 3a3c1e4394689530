"""SDSSL as a module with the cosine α schedule (Jang et al., WACV 2023, arXiv:2111.12958)."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fastssl.functional.inputs import check_temperature
from fastssl.functional.sdssl import SDSSL_METHODS, sdssl_alpha, sdssl_loss


class SDSSLLoss(nn.Module):
    """Symmetric SDSSL loss: ``sdssl_loss(q¹, z²) + sdssl_loss(q², z¹)`` with α annealed by :func:`sdssl_alpha`.

    Args:
        total_steps: optimizer steps of the whole run (the α schedule's length).
        ratio: final α.
        tau: MoCo v3 temperature (0.2).
        method: ``"mocov3"`` or ``"byol"``.

    Shape:
        student1, student2: (L, N, D) per-layer predictions of each view; teacher1, teacher2: (N, D);
        predictor_only1/2: optional (L, N, D) → scalar. ``step`` defaults to an internal persistent counter.
    """

    def __init__(self, total_steps: int, ratio: float, *, tau: float = 0.2, method: str = "mocov3") -> None:
        super().__init__()
        if method not in SDSSL_METHODS:
            raise ValueError(f"method must be one of {SDSSL_METHODS}, got {method!r}")
        if not 0 <= ratio < float("inf"):
            raise ValueError(f"ratio (the final α) must be ≥ 0 and finite, got {ratio}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"total_steps (the α schedule's length) must be a positive int, got {total_steps!r}")
        self.total_steps, self.ratio, self.tau, self.method = total_steps, ratio, check_temperature("tau", tau), method
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(
        self,
        student1: torch.Tensor,
        student2: torch.Tensor,
        teacher1: torch.Tensor,
        teacher2: torch.Tensor,
        predictor_only1: torch.Tensor | None = None,
        predictor_only2: torch.Tensor | None = None,
        step: int | None = None,
    ) -> torch.Tensor:
        alpha = sdssl_alpha(int(self.step) if step is None else step, self.total_steps, self.ratio)
        loss = sdssl_loss(student1, teacher2, predictor_only1, alpha=alpha, tau=self.tau, method=self.method)
        loss = loss + sdssl_loss(student2, teacher1, predictor_only2, alpha=alpha, tau=self.tau, method=self.method)
        if self.training:
            self.step += 1
        return loss
