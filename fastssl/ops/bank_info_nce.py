"""InfoNCE against a memory bank with one positive key per query (MoCo, He et al. 2020, arXiv:1911.05722).

Derivation (q: L2-normalized query, k⁺: its positive key, B: (K, D) bank of negatives, τ: temperature):

    z = [q·k⁺, q·b_0, …, q·b_{K-1}] / τ,   v = [k⁺, b_0, …, b_{K-1}]
    L = −log softmax(z)_0 = LSE(z) − q·k⁺/τ
    ∂L/∂q = (Σ_j softmax(z)_j v_j − k⁺)/τ = (μ − k⁺)/τ

One pass computing (LSE, μ) with the positive folded in as logit 0 yields loss and gradient. Keys get no gradient
(they come from the momentum encoder). With ``normalize=True`` the op takes raw embeddings, normalizes them itself and
saves the gradient with respect to the raw query (:mod:`fastssl.ops.unit_rows`), so autograd adds no nodes around it;
on the Triton backend the work is four kernels (prologue, statistics, merge, epilogue), plus a cast of the queries
for ``query_dtype`` and the reduction.
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


def bank_info_nce_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    bank: torch.Tensor,
    tau: float,
    *,
    reduction: str = "mean",
    query_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Materializing oracle: logits [q·k⁺, q·Bᵀ]/τ with label 0, as in MoCo's builder."""
    query, key = rounded_rows(query, query_dtype), rounded_rows(key, query_dtype)
    acc_dtype = accumulation_dtype(query, key, bank)
    q = query.to(acc_dtype)
    l_pos = (q * key.detach().to(acc_dtype)).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q @ bank.detach().to(acc_dtype, copy=True).T  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return reduce_rows(F.cross_entropy(logits, target, reduction="none"), reduction)


class BankInfoNCEFunction(torch.autograd.Function):
    """Loss and gradient from one bank pass; saves only the (N, D) gradient, never the bank."""

    @staticmethod
    def forward(
        ctx, query, key, bank, tau: float, reduction: str, backend: str, sharded: bool, query_dtype, normalize: bool
    ):
        n = query.shape[0]
        acc_dtype = accumulation_dtype(query, key, bank)
        ctx.query_dtype = query.dtype
        ctx.reduction = reduction
        if normalize and backend == "triton" and not torch.compiler.is_compiling():
            rows, grad = _fused_triton_rows_and_grad(query, key, bank, tau, reduction, sharded, query_dtype)
            ctx.save_for_backward(grad)
            return reduce_rows(rows, reduction)
        if normalize:
            query, q_denom, q_norm = unit_rows(query)
            key = unit_rows(key)[0]
        inv_tau = torch.full((n,), 1.0 / tau, dtype=acc_dtype, device=query.device)
        q_x = query.to(query_dtype or query.dtype)  # rounded when query_dtype is 16-bit; the gradient is not
        key_x = key.to(q_x.dtype)
        stats = sharded_bank_softmax_stats if sharded else bank_softmax_stats
        lse, mu = stats(q_x, inv_tau, bank, key_x, backend=backend)
        k_acc = key_x.to(acc_dtype)
        rows = torch.sub(lse, (q_x.to(acc_dtype) * k_acc).sum(dim=1), alpha=1.0 / tau)
        grad = (mu - k_acc).mul_(1.0 / (tau * max(n, 1)) if reduction == "mean" else 1.0 / tau)  # (N, D) ∂loss/∂q
        if normalize:
            grad = unit_rows_backward(grad, query.to(acc_dtype), q_denom, q_norm)
        ctx.save_for_backward(grad)
        return reduce_rows(rows, reduction)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        grad_query = scale_saved_gradient(grad, grad_output, ctx.reduction, ctx.query_dtype)
        return grad_query, None, None, None, None, None, None, None, None


def _fused_triton_rows_and_grad(
    query: torch.Tensor,
    key: torch.Tensor,
    bank: torch.Tensor,
    tau: float,
    reduction: str,
    sharded: bool,
    query_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw embeddings to (per-row loss, saved gradient) in four launches: the prologue kernel (normalize queries and
    keys, temperatures), the two statistics kernels and the epilogue kernel (loss rows and the raw-query gradient)."""
    from fastssl.kernels.bank_loss_epilogue import bank_loss_epilogue
    from fastssl.kernels.unit_rows import unit_rows as normalize_rows

    n = query.shape[0]
    x_hat, norm, inv_tau = normalize_rows(query, key, 1.0 / tau, 1.0 / tau)  # (2N, D): [q̂; k̂]
    x_in = x_hat if query_dtype is None else x_hat.to(query_dtype)
    stats = sharded_bank_softmax_stats if sharded else bank_softmax_stats
    lse, mu = stats(x_in[:n], inv_tau[:n], bank, x_in[n:], backend="triton")
    grad_scale = 1.0 / (tau * max(n, 1)) if reduction == "mean" else 1.0 / tau
    return bank_loss_epilogue(
        x_hat, norm, lse, mu, 1.0 / tau, 1.0 / tau, grad_scale, soft_ce=False, round_dtype=query_dtype
    )


def bank_info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    bank: torch.Tensor,
    tau: float,
    *,
    reduction: str = "mean",
    backend: str = "auto",
    sharded: bool = False,
    query_dtype: torch.dtype | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """InfoNCE of normalized queries with positive ``key`` and negatives ``bank``.

    Args:
        query: (N, D) L2-normalized queries (raw with ``normalize``); receives the gradient.
        key: (N, D) L2-normalized positive keys (raw with ``normalize``); no gradient.
        bank: (K, D) negatives, used as stored.
        tau: temperature τ.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        backend: see :mod:`fastssl.ops.backend`.
        sharded: ``bank`` is this rank's shard of a bank split across the default process group; the negatives are
            the union of the shards (:mod:`fastssl.ops.sharded_bank_softmax_stats`). Every rank must call this.
        query_dtype: round the query and key values to this dtype (e.g. the bank's fp16) before the kernels; the
            gradient stays in the query's dtype, unrounded.
        normalize: L2-normalize ``query`` and ``key`` here (in fp32, as ``F.normalize``), the normalization's
            backward folded into the saved gradient.

    Returns:
        Scalar (or (N,)) in fp32 (fp64 for fp64 inputs).
    """
    backend = resolve_backend(backend, query, key, bank, triton_ok=triton_serves(bank), bank=bank)
    if sharded and backend == "reference":
        raise ValueError('a sharded bank needs the "streaming" or "triton" backend (the reference sees one shard)')
    if backend == "reference":
        if normalize:
            query, key = normalized_with_autograd(query), normalized_with_autograd(key.detach())
        return bank_info_nce_reference(query, key, bank, tau, reduction=reduction, query_dtype=query_dtype)
    return BankInfoNCEFunction.apply(
        query, key.detach(), bank.detach(), tau, reduction, backend, sharded, query_dtype, normalize
    )
