"""ReSSL: "ReSSL: Relational Self-Supervised Learning with Weak Augmentation" (Zheng et al., NeurIPS 2021,
arXiv:2107.09282; journal version with predictor and InfoNCE warm-up, arXiv:2203.08717)."""

from __future__ import annotations

import torch

from fastssl.bank import MemoryBank
from fastssl.functional.soft_bank_cross_entropy import soft_bank_cross_entropy


def ressl_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    bank: torch.Tensor | MemoryBank,
    tau_student: float = 0.1,
    tau_teacher: float = 0.04,
    *,
    backend: str = "auto",
    query_precision: str = "float32",
) -> torch.Tensor:
    """ReSSL relational consistency loss: CE(softmax(t·Bᵀ/τ_t), softmax(s·Bᵀ/τ_s)), mean over the batch.

    As in the official ``ressl.py``: the teacher sees the WEAK view, the target is sharpened (τ_t < τ_s), the loss is
    the cross-entropy (not the KL), and the teacher keys are enqueued after the loss.

    Args:
        student: (N, D) student embeddings of the strong view.
        teacher: (N, D) teacher embeddings of the weak view, detached.
        bank: (K, D) bank or :class:`~fastssl.MemoryBank`.
        tau_student: τ_s (0.1).
        tau_teacher: τ_t (0.04; 0.03 in the ImageNet journal setting).
        backend: see :func:`fastssl.functional.soft_bank_cross_entropy`.
        query_precision: ``"float32"`` or ``"bank"``, see :func:`fastssl.functional.soft_bank_cross_entropy`.

    Returns:
        fp32 scalar.
    """
    return soft_bank_cross_entropy(
        student, teacher, bank, tau_student, tau_teacher, kl=False, backend=backend, query_precision=query_precision
    )
