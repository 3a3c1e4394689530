"""Rounding of the query rows to a 16-bit dtype for the bank ops (``query_precision="bank"``)."""

from __future__ import annotations

import torch


def rounded_rows(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` with its values rounded to ``dtype`` but its own dtype kept, differentiable as the identity (the
    straight-through gradient the fused ops give): the materializing references see exactly the values the kernels
    get. ``None`` returns ``x``."""
    if dtype is None or dtype == x.dtype:
        return x
    return x + (x.detach().to(dtype).to(x.dtype) - x.detach())
