"""MoCo v2 InfoNCE as a module that owns its queue (He et al. 2020, arXiv:1911.05722; Chen et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.bank import MemoryBank
from fastssl.functional.inputs import check_query_precision, check_temperature
from fastssl.functional.moco import moco_loss
from fastssl.losses.bank_owner import own_or_given_bank
from fastssl.ops.backend import check_backend


class MoCoLoss(nn.Module):
    """InfoNCE with the queue as negatives; enqueues the keys AFTER the loss (MoCo ``builder.py``).

    Args:
        dim: embedding dimension D (omit when passing ``bank``).
        bank_size: queue length K (MoCo: 65,536).
        tau: temperature (MoCo v2: 0.2).
        bank: an existing :class:`~fastssl.MemoryBank`.
        bank_dtype: storage dtype of a new bank.
        backend: loss backend.
        query_precision: ``"float32"`` (fp32-accurate logits) or ``"bank"`` (queries rounded to the bank's 16-bit
            dtype: faster kernels), see :func:`fastssl.functional.soft_bank_cross_entropy`.

    Shape:
        query, key: (N, D) → scalar.
    """

    def __init__(
        self,
        dim: int | None = None,
        bank_size: int = 65_536,
        *,
        tau: float = 0.2,
        bank: MemoryBank | None = None,
        bank_dtype: torch.dtype = torch.float16,
        backend: str = "auto",
        query_precision: str = "float32",
    ) -> None:
        super().__init__()
        self.bank = own_or_given_bank(bank, dim, bank_size, dtype=bank_dtype, init="random", store_labels=False)
        self.tau, self.backend = check_temperature("tau", tau), check_backend(backend)
        self.query_precision = check_query_precision(query_precision)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        loss = moco_loss(query, key, self.bank, self.tau, backend=self.backend, query_precision=self.query_precision)
        if self.training:
            self.bank.enqueue(key.detach())
        return loss
