"""MSF: "Mean Shift for Self-Supervised Learning" (Koohpayegani et al., ICCV 2021, arXiv:2105.07269)."""

from __future__ import annotations

import torch

from fastssl.bank import MemoryBank
from fastssl.functional.bank_topk import bank_topk
from fastssl.functional.byol import cosine_distance
from fastssl.functional.inputs import check_embeddings, normalized


def msf_loss(
    query: torch.Tensor,
    target: torch.Tensor,
    bank: torch.Tensor | MemoryBank,
    k: int = 5,
    *,
    backend: str = "auto",
    index: torch.Tensor | None = None,
    query_precision: str = "float32",
) -> torch.Tensor:
    """Mean-shift loss: pull the query toward the k bank neighbours of the TARGET.

    As in the official ``train_msf.py``: the bank ALREADY contains this batch's targets (enqueue before calling), the
    neighbours are the top-k of target·Bᵀ (chosen by the target, not the query), and the loss is the mean over the k
    neighbours of 2 − 2·cos(query, neighbour), averaged over the batch. With k = 1 the nearest neighbour of a target
    is itself, so the loss equals :func:`~fastssl.functional.byol_loss` (exactly, for a bank stored in the target's
    precision).

    Args:
        query: (N, D) online predictions (normalized here); receives the gradient.
        target: (N, D) target embeddings (normalized here; detached); must already be in the bank.
        bank: (K, D) bank or :class:`~fastssl.MemoryBank`.
        k: neighbours (paper: 5; 10 for the 1M bank).
        backend: top-k backend, see :func:`fastssl.functional.bank_topk`.
        index: (N, k) neighbour indices already found by ``bank_topk(target, bank, k)``; skips the search (the loss
            module shares one search between the loss and :func:`~fastssl.functional.mean_shift_purity`).
        query_precision: precision of the neighbour search, see :func:`~fastssl.functional.bank_topk` (the loss itself
            is always computed from the unrounded query and the stored neighbour rows).

    Returns:
        fp32 scalar (fp64 for fp64 inputs).
    """
    check_embeddings("query", query)
    check_embeddings("target", target, like=query, like_name="query")
    if index is None:
        _, index = bank_topk(target, bank, k, backend=backend, query_precision=query_precision)  # validates bank, k
    elif index.shape != (target.shape[0], k) or index.dtype != torch.int64:
        raise ValueError(f"index must be int64 of shape {(target.shape[0], k)}, got {index.dtype} {tuple(index.shape)}")
    rows = (bank.keys if isinstance(bank, MemoryBank) else bank).detach()
    acc_dtype = torch.float64 if torch.float64 in (query.dtype, rows.dtype) else torch.float32
    neighbours = rows[index].to(acc_dtype)  # (N, k, D): a gather, so the bank itself is never saved for backward
    q = normalized(query).to(acc_dtype)
    return cosine_distance(q.unsqueeze(1).expand_as(neighbours), neighbours).mean()
