"""The bank storage dtype named in a method config."""

from __future__ import annotations

import torch

from fastssl.train.config import MethodConfig


def bank_dtype(method: MethodConfig) -> torch.dtype:
    return getattr(torch, method.bank_dtype)
