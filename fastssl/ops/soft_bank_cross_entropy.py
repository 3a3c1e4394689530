"""Soft-target cross-entropy between teacher and student similarity distributions over a memory bank.

Used by ISD (KL, Tejankar et al. 2021, arXiv:2012.09259) and ReSSL (CE, Zheng et al. 2021, arXiv:2107.09282).

Derivation (s, t: L2-normalized student / teacher rows; B: (K, D) bank; S = s·Bᵀ/τ_s, T = t·Bᵀ/τ_t):

    p = softmax(T),  q = softmax(S),  μ_p = Σ_j p_j b_j,  μ_q = Σ_j q_j b_j
    CE(p, q) = −Σ_j p_j log q_j = LSE(S) − Σ_j p_j S_j = LSE(S) − (s·μ_p)/τ_s
    H(p)     = LSE(T) − (t·μ_p)/τ_t,   KL(p‖q) = CE − H(p)
    ∂CE/∂s   = Σ_j q_j b_j/τ_s − Σ_j p_j b_j/τ_s = (μ_q − μ_p)/τ_s      (= ∂KL/∂s: H(p) has no s)

So one pass computing (LSE, μ) for the 2N stacked rows [s/τ_s; t/τ_t] yields the loss AND its gradient; backward
only scales the saved (N, D) gradient by grad_output. The teacher gets no gradient (stop-gradient in both papers).
With ``normalize=False`` the chain rule through the L2-normalization is left to autograd outside this op; with
``normalize=True`` the op normalizes raw rows itself and folds that Jacobian into the saved gradient
(:mod:`fastssl.ops.unit_rows`), so autograd adds no nodes around it; on the Triton backend the work is four kernels
(prologue, statistics, merge, epilogue), plus a cast of the rows for ``query_dtype`` and the reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.ops.backend import accumulation_dtype, resolve_backend, triton_serves
from fastssl.ops.bank_softmax_stats import bank_softmax_stats
from fastssl.ops.query_dtype import rounded_rows
from fastssl.ops.reduction import reduce_rows, scale_saved_gradient
from fastssl.ops.sharded_bank_softmax_stats import sharded_bank_softmax_stats
from fastssl.ops.unit_rows import normalized_with_autograd, unit_rows, unit_rows_backward


def soft_bank_cross_entropy_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    bank: torch.Tensor,
    tau_student: float,
    tau_teacher: float,
    *,
    kl: bool = False,
    reduction: str = "mean",
    query_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Materializing oracle: builds both (N, K) logit matrices and differentiates with autograd."""
    student, teacher = rounded_rows(student, query_dtype), rounded_rows(teacher, query_dtype)
    acc_dtype = accumulation_dtype(student, teacher, bank)
    b = bank.detach().to(acc_dtype, copy=True)  # a copy, so an in-place enqueue after the loss cannot break backward
    log_q = F.log_softmax(student.to(acc_dtype) @ b.T / tau_student, dim=1)
    log_p = F.log_softmax(teacher.detach().to(acc_dtype) @ b.T / tau_teacher, dim=1)
    p = log_p.exp()
    rows = -(p * log_q).sum(dim=1)
    if kl:
        rows = rows + (p * log_p).sum(dim=1)
    return reduce_rows(rows, reduction)


class SoftBankCrossEntropyFunction(torch.autograd.Function):
    """Loss and gradient from one bank pass; saves only the (N, D) gradient, never the bank."""

    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        bank: torch.Tensor,
        tau_student: float,
        tau_teacher: float,
        kl: bool,
        reduction: str,
        backend: str,
        sharded: bool,
        query_dtype: torch.dtype | None,
        normalize: bool,
    ) -> torch.Tensor:
        n = student.shape[0]
        acc_dtype = accumulation_dtype(student, teacher, bank)
        ctx.student_dtype = student.dtype
        ctx.reduction = reduction
        if normalize and backend == "triton" and not torch.compiler.is_compiling():
            rows, grad = _fused_triton_rows_and_grad(
                student, teacher, bank, tau_student, tau_teacher, kl, reduction, sharded, query_dtype
            )
            ctx.save_for_backward(grad)
            return reduce_rows(rows, reduction)
        if normalize:
            student, s_denom, s_norm = unit_rows(student)
            teacher = unit_rows(teacher)[0]
        x_dtype = query_dtype or torch.promote_types(student.dtype, teacher.dtype)
        x = torch.cat([student.to(x_dtype), teacher.to(x_dtype)])  # (2N, D), rounded when query_dtype is 16-bit
        inv_tau = torch.full((2 * n,), 1.0 / tau_student, dtype=acc_dtype, device=x.device)
        inv_tau[n:].fill_(1.0 / tau_teacher)
        stats = sharded_bank_softmax_stats if sharded else bank_softmax_stats
        lse, mu = stats(x, inv_tau, bank, backend=backend)
        lse_q, lse_p, mu_q, mu_p = lse[:n], lse[n:], mu[:n], mu[n:]
        s, t = x[:n].to(acc_dtype), x[n:].to(acc_dtype)
        rows = torch.sub(lse_q, (s * mu_p).sum(dim=1), alpha=1.0 / tau_student)
        if kl:
            rows = rows.sub_(lse_p).add_((t * mu_p).sum(dim=1), alpha=1.0 / tau_teacher)
        # (N, D) ∂loss/∂s: (μ_q − μ_p)/τ_s per row
        grad = (mu_q - mu_p).mul_(1.0 / (tau_student * max(n, 1)) if reduction == "mean" else 1.0 / tau_student)
        if normalize:
            grad = unit_rows_backward(grad, student.to(acc_dtype), s_denom, s_norm)
        ctx.save_for_backward(grad)
        return reduce_rows(rows, reduction)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (
            scale_saved_gradient(grad, grad_output, ctx.reduction, ctx.student_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _fused_triton_rows_and_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    bank: torch.Tensor,
    tau_student: float,
    tau_teacher: float,
    kl: bool,
    reduction: str,
    sharded: bool,
    query_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw embeddings to (per-row loss, saved gradient) in four launches: the prologue kernel (normalize and stack
    student and teacher rows, temperatures), the two statistics kernels and the epilogue kernel (loss rows and the
    raw-student gradient)."""
    from fastssl.kernels.bank_loss_epilogue import bank_loss_epilogue
    from fastssl.kernels.unit_rows import unit_rows as normalize_rows

    n = student.shape[0]
    x_hat, norm, inv_tau = normalize_rows(student, teacher, 1.0 / tau_student, 1.0 / tau_teacher)  # (2N, D): [ŝ; t̂]
    x_in = x_hat if query_dtype is None else x_hat.to(query_dtype)
    stats = sharded_bank_softmax_stats if sharded else bank_softmax_stats
    lse, mu = stats(x_in, inv_tau, bank, backend="triton")
    grad_scale = 1.0 / (tau_student * max(n, 1)) if reduction == "mean" else 1.0 / tau_student
    return bank_loss_epilogue(
        x_hat, norm, lse, mu, 1.0 / tau_student, 1.0 / tau_teacher, grad_scale,
        soft_ce=True, kl=kl, round_dtype=query_dtype,
    )  # fmt: skip


def soft_bank_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    bank: torch.Tensor,
    tau_student: float,
    tau_teacher: float,
    *,
    kl: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    sharded: bool = False,
    query_dtype: torch.dtype | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """CE (or KL) of softmax(t·Bᵀ/τ_t) against softmax(s·Bᵀ/τ_s) for normalized rows.

    Args:
        student: (N, D) L2-normalized student rows (raw with ``normalize``); receives the gradient.
        teacher: (N, D) L2-normalized teacher rows (raw with ``normalize``); no gradient.
        bank: (K, D) bank rows, used as stored.
        tau_student: τ_s.
        tau_teacher: τ_t.
        kl: subtract the teacher entropy H(p), giving KL(p‖q).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        backend: see :mod:`fastssl.ops.backend`.
        sharded: ``bank`` is this rank's shard of a bank split across the default process group; the loss is over
            the union of the shards (:mod:`fastssl.ops.sharded_bank_softmax_stats`). Every rank must call this.
        query_dtype: round both rows' values to this dtype (e.g. the bank's fp16) before the kernels, which then
            need one tensor-core dot per tile; the gradient stays in the student's dtype, unrounded.
        normalize: L2-normalize ``student`` and ``teacher`` here (in fp32, as ``F.normalize``), the normalization's
            backward folded into the saved gradient.

    Returns:
        Scalar (or (N,) for ``"none"``) in fp32 (fp64 for fp64 inputs).
    """
    backend = resolve_backend(backend, student, teacher, bank, triton_ok=triton_serves(bank), bank=bank)
    if sharded and backend == "reference":
        raise ValueError('a sharded bank needs the "streaming" or "triton" backend (the reference sees one shard)')
    if backend == "reference":
        if normalize:
            student, teacher = normalized_with_autograd(student), normalized_with_autograd(teacher.detach())
        return soft_bank_cross_entropy_reference(
            student, teacher, bank, tau_student, tau_teacher, kl=kl, reduction=reduction, query_dtype=query_dtype
        )
    return SoftBankCrossEntropyFunction.apply(
        student,
        teacher.detach(),
        bank.detach(),
        tau_student,
        tau_teacher,
        kl,
        reduction,
        backend,
        sharded,
        query_dtype,
        normalize,
    )
