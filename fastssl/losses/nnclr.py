"""NNCLR as a module that owns its support set (Dwibedi et al., ICCV 2021, arXiv:2104.14548)."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.bank import MemoryBank
from fastssl.functional.inputs import check_temperature
from fastssl.functional.nnclr import nnclr_loss
from fastssl.losses.bank_owner import own_or_given_bank
from fastssl.ops.backend import check_backend


class NNCLRLoss(nn.Module):
    """Nearest-neighbour InfoNCE; enqueues the queries' projections into the support set AFTER the loss.

    Args:
        dim: embedding dimension D (omit when passing ``bank``).
        bank_size: support-set size (paper: 98,304).
        tau: temperature (0.1).
        bank: an existing :class:`~fastssl.MemoryBank`.
        bank_dtype: storage dtype of a new bank.
        backend: top-k backend.

    Shape:
        query (projections z₁ of view 1), positive (predictions p₂ of view 2): (N, D) → scalar. For the symmetric
        loss also pass ``query2`` (z₂) and ``positive2`` (p₁); only z₁ is enqueued, once.
    """

    def __init__(
        self,
        dim: int | None = None,
        bank_size: int = 98_304,
        *,
        tau: float = 0.1,
        bank: MemoryBank | None = None,
        bank_dtype: torch.dtype = torch.float16,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.bank = own_or_given_bank(bank, dim, bank_size, dtype=bank_dtype, init="random", store_labels=False)
        self.tau, self.backend = check_temperature("tau", tau), check_backend(backend)

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        query2: torch.Tensor | None = None,
        positive2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = nnclr_loss(query, positive, self.bank, self.tau, backend=self.backend)
        if (query2 is None) != (positive2 is None):
            raise ValueError("pass both query2 and positive2 for the symmetric loss, or neither")
        if query2 is not None:
            loss = loss + nnclr_loss(query2, positive2, self.bank, self.tau, backend=self.backend)
        if self.training:
            self.bank.enqueue(query.detach())
        return loss
