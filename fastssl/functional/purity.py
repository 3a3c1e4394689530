"""MSF purity: the fraction of a target's k bank neighbours (itself included) that share its label (MSF, Fig. 4)."""

from __future__ import annotations

import torch

from fastssl.bank import MemoryBank
from fastssl.functional.bank_topk import bank_topk


def mean_shift_purity(
    target: torch.Tensor,
    labels: torch.Tensor,
    bank: torch.Tensor | MemoryBank,
    k: int = 5,
    *,
    bank_labels: torch.Tensor | None = None,
    backend: str = "auto",
    index: torch.Tensor | None = None,
    query_precision: str = "float32",
) -> torch.Tensor:
    """Purity of the mean-shift neighbourhoods, a free training-time monitor of how semantic the bank has become.

    Like the official ``train_msf.py`` the bank already contains the batch, so each target's own entry counts as one
    of its k neighbours. Rows with unknown label (-1) count as mismatches.

    Args:
        target: (N, D) target embeddings (normalized here).
        labels: (N,) int64 ground-truth labels of the batch.
        bank: (K, D) bank or :class:`~fastssl.MemoryBank` built with ``store_labels=True``.
        k: neighbours.
        bank_labels: (K,) labels of the bank rows; taken from the MemoryBank when omitted.
        backend: top-k backend.
        index: (N, k) neighbour indices already found by ``bank_topk(target, bank, k)``; skips the search.
        query_precision: precision of the search, see :func:`~fastssl.functional.bank_topk`.

    Returns:
        fp32 scalar in [0, 1].
    """
    if bank_labels is None:
        if not isinstance(bank, MemoryBank) or bank.labels is None:
            raise ValueError("mean_shift_purity needs bank_labels, or a MemoryBank built with store_labels=True")
        bank_labels = bank.labels
    for name, value in (("labels", labels), ("bank_labels", bank_labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of integer labels, got {type(value).__name__}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be integers, got {value.dtype}")
    if labels.shape != (target.shape[0],):
        raise ValueError(f"labels must have shape ({target.shape[0]},), got {tuple(labels.shape)}")
    rows = bank.keys if isinstance(bank, MemoryBank) else bank
    if bank_labels.shape != (rows.shape[0],):
        raise ValueError(
            f"bank_labels must have shape ({rows.shape[0]},) like the bank's rows, got {tuple(bank_labels.shape)}"
        )
    if index is None:
        _, index = bank_topk(target, bank, k, backend=backend, query_precision=query_precision)
    elif index.shape != (target.shape[0], k):
        raise ValueError(f"index must have shape ({target.shape[0]}, {k}), got {tuple(index.shape)}")
    neighbour_labels = bank_labels[index]  # (N, k)
    return (neighbour_labels == labels[:, None]).float().mean()
