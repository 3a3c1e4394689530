"""MoCo v2 InfoNCE against a queue of negatives: "Momentum Contrast for Unsupervised Visual Representation Learning"
(He et al., CVPR 2020, arXiv:1911.05722) and "Improved Baselines with Momentum Contrastive Learning" (Chen et al.
2020, arXiv:2003.04297)."""

from __future__ import annotations

import torch

from fastssl.bank import MemoryBank
from fastssl.functional.inputs import (
    bank_rows,
    check_embeddings,
    check_temperature,
    checked_on_every_rank,
    is_sharded_bank,
    query_dtype_for,
)
from fastssl.ops.bank_info_nce import bank_info_nce


def moco_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    bank: torch.Tensor | MemoryBank,
    tau: float = 0.2,
    *,
    reduction: str = "mean",
    backend: str = "auto",
    query_precision: str = "float32",
) -> torch.Tensor:
    """InfoNCE with logits [q·k⁺, q·Bᵀ]/τ and label 0, as in MoCo's ``builder.py``.

    Args:
        query: (N, D) query embeddings q (normalized here); receives the gradient.
        key: (N, D) positive keys k⁺ from the momentum encoder (normalized here; detached).
        bank: (K, D) negatives or :class:`~fastssl.MemoryBank` (enqueue the keys after the loss); a ``sharded``
            MemoryBank under torch.distributed stands for the union of every rank's shard (all ranks must call).
        tau: temperature τ (MoCo v2: 0.2).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        backend: ``"auto"`` | ``"reference"`` | ``"streaming"`` | ``"triton"``.
        query_precision: ``"float32"`` or ``"bank"``, see :func:`~fastssl.functional.soft_bank_cross_entropy`.

    Returns:
        fp32 scalar (fp64 for fp64 inputs), or (N,) with ``reduction="none"``.
    """
    with checked_on_every_rank(bank):
        check_embeddings("query", query)
        check_embeddings("key", key, like=query, like_name="query")
        rows = bank_rows(bank, query, shardable=True)
        tau = check_temperature("tau", tau)
    query_dtype = query_dtype_for(rows, query, query_precision)
    return bank_info_nce(
        query,
        key.detach(),
        rows,
        tau,
        reduction=reduction,
        backend=backend,
        sharded=is_sharded_bank(bank),
        query_dtype=query_dtype,
        normalize=True,  # inside the op: the normalization's backward is folded into its saved gradient
    )
