"""MSF as a module that owns its bank (Koohpayegani et al., ICCV 2021, arXiv:2105.07269)."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.bank import MemoryBank
from fastssl.collectives import distributed_world
from fastssl.functional.bank_topk import bank_topk
from fastssl.functional.inputs import check_embeddings, check_query_precision
from fastssl.functional.msf import msf_loss
from fastssl.functional.purity import mean_shift_purity
from fastssl.losses.bank_owner import own_or_given_bank
from fastssl.ops.backend import check_backend


class MSFLoss(nn.Module):
    """Mean-shift loss; enqueues the targets BEFORE the neighbour search, like the official ``train_msf.py``.

    Args:
        dim: embedding dimension D (omit when passing ``bank``).
        bank_size: K (official: 128,000 or 1,024,000).
        k: neighbours (5; 10 with the 1.024M bank).
        bank: an existing :class:`~fastssl.MemoryBank` (``store_labels=True`` to monitor purity).
        bank_dtype: storage dtype of a new bank.
        store_labels: keep labels in a new bank so ``forward(..., labels=)`` records purity.
        backend: top-k backend.
        query_precision: ``"float32"`` (fp32-accurate search) or ``"bank"`` (targets rounded to the bank's 16-bit
            dtype for the search: one tensor-core dot per tile), see :func:`~fastssl.functional.bank_topk`.

    Shape:
        query, target: (N, D); labels: optional (N,) → scalar. With labels, ``last_purity`` holds the batch's MSF
        purity (self match included) as a 0-d tensor.
    """

    def __init__(
        self,
        dim: int | None = None,
        bank_size: int = 128_000,
        *,
        k: int = 5,
        bank: MemoryBank | None = None,
        bank_dtype: torch.dtype = torch.float16,
        store_labels: bool = False,
        backend: str = "auto",
        query_precision: str = "float32",
    ) -> None:
        super().__init__()
        self.bank = own_or_given_bank(bank, dim, bank_size, dtype=bank_dtype, init="random", store_labels=store_labels)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.bank.size:
            raise ValueError(f"k must be an int in [1, {self.bank.size}] (the bank size), got {k!r}")
        self.k, self.backend, self.query_precision = k, check_backend(backend), check_query_precision(query_precision)
        self.last_purity: torch.Tensor | None = None

    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # The targets are enqueued before the search, so the inputs are checked first: a bad call leaves the bank as
        # it was (the enqueue checks the targets' values and the labels itself).
        check_embeddings("query", query)
        check_embeddings("target", target, like=query, like_name="query")
        if distributed_world() <= 1:  # under torchrun the rows gathered are known after the enqueue (on every rank)
            rows_after = min(self.bank.size, len(self.bank) + target.shape[0])
            if self.k > rows_after:
                raise ValueError(
                    f"k={self.k} neighbours, but the bank would hold only {rows_after} valid rows after enqueuing this "
                    f"batch; the bank is unchanged (fill it first, or use a bank created with init='random')"
                )
        stored_labels = labels if self.bank.label_queue is not None else None
        self.bank.enqueue(target.detach(), stored_labels)
        # One search serves the loss and the purity monitor, as in the official code.
        _, index = bank_topk(
            target.detach(), self.bank, self.k, backend=self.backend, query_precision=self.query_precision
        )
        loss = msf_loss(query, target, self.bank, self.k, index=index)
        if labels is not None and self.bank.label_queue is not None:
            self.last_purity = mean_shift_purity(target.detach(), labels, self.bank, self.k, index=index)
        return loss
