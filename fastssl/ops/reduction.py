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


def scale_saved_gradient(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str, dtype: torch.dtype):
    """Backward of the loss ops: the (N, D) gradient saved in forward times grad_output, in the input's dtype.

    One fused multiply; comparing grad_output with 1 first to skip it would cost a device sync per step.
    """
    scale = grad_output[:, None] if reduction == "none" else grad_output
    return (grad * scale).to(dtype)
