"""Row reductions shared by the loss ops."""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduces per-row losses (N,) by ``"mean"`` (a scalar), ``"sum"`` (a scalar) or ``"none"`` (unchanged)."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
