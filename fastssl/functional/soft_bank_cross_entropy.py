"""Functional soft-target bank cross-entropy (the shared core of ISD and ReSSL)."""

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
from fastssl.ops.soft_bank_cross_entropy import soft_bank_cross_entropy as soft_bank_cross_entropy_op


def soft_bank_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    bank: torch.Tensor | MemoryBank,
    tau_student: float,
    tau_teacher: float,
    *,
    kl: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    query_precision: str = "float32",
) -> torch.Tensor:
    """Per row CE(softmax(t·Bᵀ/τ_t), softmax(s·Bᵀ/τ_s)); with ``kl=True`` the KL divergence KL(p_t‖p_s).

    Never materializes the (N, K) logits except with ``backend="reference"``.

    Args:
        student: (N, D) student embeddings (normalized here); the only input that receives a gradient.
        teacher: (N, D) teacher embeddings (normalized here; detached).
        bank: (K, D) tensor or :class:`~fastssl.MemoryBank` (its valid rows); rows are used as stored. A ``sharded``
            MemoryBank under torch.distributed stands for the union of every rank's shard (all ranks must call).
        tau_student: student temperature τ_s.
        tau_teacher: teacher temperature τ_t (τ_t < τ_s sharpens the target).
        kl: subtract the teacher entropy, giving KL(p_t‖p_s). The streaming and Triton backends take the entropy
            from the one-pass statistics as t·μ_t/τ_t − LSE_t, two terms of size ~1/τ_t that cancel: in fp32 its
            absolute error is ~2⁻²⁴/τ_t (1e-5 at ISD's τ_t = 0.01, 1e-3 at 1e-5, growing without bound as τ_t → 0).
            The reference backend (materialized logits) has no such term.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        backend: ``"auto"`` | ``"reference"`` | ``"streaming"`` | ``"triton"``.
        query_precision: ``"float32"`` (default: fp32-accurate logits) or ``"bank"`` (queries rounded to a 16-bit
            bank's dtype: one tensor-core dot instead of two or three; see
            :func:`~fastssl.functional.inputs.query_dtype_for`).

    Returns:
        fp32 scalar (fp64 for fp64 inputs), or (N,) with ``reduction="none"``.
    """
    with checked_on_every_rank(bank):
        check_embeddings("student", student)
        check_embeddings("teacher", teacher, like=student, like_name="student")
        rows = bank_rows(bank, student, shardable=True)
        tau_student = check_temperature("tau_student", tau_student)
        tau_teacher = check_temperature("tau_teacher", tau_teacher)
    return soft_bank_cross_entropy_op(
        student,
        teacher.detach(),
        rows,
        tau_student,
        tau_teacher,
        kl=kl,
        reduction=reduction,
        backend=backend,
        sharded=is_sharded_bank(bank),
        query_dtype=query_dtype_for(rows, student, query_precision),
        normalize=True,  # inside the op: the normalization's backward is folded into its saved gradient
    )
