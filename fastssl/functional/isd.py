"""ISD: "ISD: Self-Supervised Learning by Iterative Similarity Distillation" (Tejankar et al., ICCV 2021,
arXiv:2012.09259)."""

from __future__ import annotations

import torch

from fastssl.bank import MemoryBank
from fastssl.functional.soft_bank_cross_entropy import soft_bank_cross_entropy


def isd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    bank: torch.Tensor | MemoryBank,
    tau_student: float = 0.1,
    tau_teacher: float = 0.01,
    *,
    backend: str = "auto",
    query_precision: str = "float32",
) -> torch.Tensor:
    """ISD loss: KL(p_t‖p_s) of the teacher's and student's similarity distributions over the bank, batch mean.

    As in the official ``train_isd_plus.py``: ``F.kl_div(log_softmax(s·Bᵀ/τ_s), softmax(t·Bᵀ/τ_t),
    reduction="batchmean")``; the current batch is NOT in the bank (enqueue the teacher keys after the loss).

    Args:
        student: (N, D) student (query) embeddings.
        teacher: (N, D) teacher (momentum-encoder) embeddings, detached.
        bank: (K, D) bank or :class:`~fastssl.MemoryBank`.
        tau_student: τ_s (paper: 0.1).
        tau_teacher: τ_t (paper: 0.01).
        backend: see :func:`fastssl.functional.soft_bank_cross_entropy`.
        query_precision: ``"float32"`` or ``"bank"``, see :func:`fastssl.functional.soft_bank_cross_entropy`.

    Returns:
        fp32 scalar.
    """
    return soft_bank_cross_entropy(
        student, teacher, bank, tau_student, tau_teacher, kl=True, backend=backend, query_precision=query_precision
    )
