"""NNCLR: "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations"
(Dwibedi et al., ICCV 2021, arXiv:2104.14548)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.bank import MemoryBank
from fastssl.functional.bank_topk import bank_topk
from fastssl.functional.inputs import bank_rows, check_embeddings, check_temperature, normalized


def nnclr_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    support: torch.Tensor | MemoryBank,
    tau: float = 0.1,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """NNCLR InfoNCE for one direction: the support-set nearest neighbour of each query is its anchor.

    L = −(1/N) Σ_i log softmax_i(NN(z_i) · p⁺ᵀ / τ) over the batch: the positive is the other view's prediction of
    the same image, the negatives are the other images' predictions. NN(z) is a bank row, so it receives no gradient;
    the gradient flows to ``positive`` (NNCLR's predictor output). Call twice, swapping views, for the symmetric loss.

    Args:
        query: (N, D) projections z of view 1 (normalized here) used to look up neighbours.
        positive: (N, D) predictions p of view 2 (normalized here); receives the gradient.
        support: (K, D) support set or :class:`~fastssl.MemoryBank` (enqueue z after the loss, as in the paper).
        tau: temperature (paper: 0.1).
        backend: top-k backend.

    Returns:
        fp32 scalar (fp64 for fp64 inputs).
    """
    check_embeddings("query", query)
    check_embeddings("positive", positive, like=query, like_name="query")
    rows = bank_rows(support, query).detach()
    tau = check_temperature("tau", tau)
    _, index = bank_topk(query, rows, 1, backend=backend)
    acc_dtype = torch.float64 if torch.float64 in (positive.dtype, rows.dtype) else torch.float32
    anchors = rows[index[:, 0]].to(acc_dtype)  # (N, D) nearest neighbours
    p = normalized(positive).to(acc_dtype)
    logits = anchors @ p.T / tau
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))
