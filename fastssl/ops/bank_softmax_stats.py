"""Softmax statistics of query rows against a memory bank: per-row LSE and μ = Σ_j softmax_j · v_j.

Every bank loss of fastssl reduces to these two statistics (derivation in
:mod:`fastssl.ops.soft_bank_cross_entropy` and :mod:`fastssl.ops.bank_info_nce`). For row r with inverse temperature
β_r = 1/τ_r, optional positive key k⁺_r, and bank B = [b_0 … b_{K-1}]:

    z_r = β_r · [x_r·k⁺_r, x_r·b_0, …, x_r·b_{K-1}]          (the positive only if given)
    lse_r = log Σ_j exp(z_rj)
    μ_r = Σ_j softmax(z_r)_j · v_j,   v = [k⁺_r, b_0, …, b_{K-1}]

The streaming backend is FlashAttention's forward with V = K = bank, in PyTorch: a running max m, normalizer l and
weighted sum acc are rescaled chunk by chunk, so memory is O(R·D + R·chunk) and never O(R·K).
"""

from __future__ import annotations

import torch

from fastssl.ops.backend import accumulation_dtype

DEFAULT_CHUNK = 8192


def bank_softmax_stats_streaming(
    x: torch.Tensor,
    inv_tau: torch.Tensor,
    bank: torch.Tensor,
    pos: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One online-softmax pass over ``bank`` in chunks (pure PyTorch, no autograd needed).

    Args:
        x: (R, D) query rows, any float dtype.
        inv_tau: (R,) per-row inverse temperature 1/τ.
        bank: (K, D) bank rows, used as stored.
        pos: optional (R, D) positive key per row, prepended as logit 0.
        chunk_size: bank rows per step (default DEFAULT_CHUNK); extra memory is about 2·R·chunk_size numbers.

    Returns:
        lse: (R,) natural-log LSE of the logits, fp32 (fp64 for fp64 inputs).
        mu: (R, D) softmax-weighted mean of the values, same dtype as ``lse``.
    """
    chunk_size = chunk_size or DEFAULT_CHUNK
    acc_dtype = accumulation_dtype(x, bank)
    scaled_x = x.to(acc_dtype) * inv_tau.to(acc_dtype)[:, None]  # (R, D), β folded into the query
    rows, dim = x.shape
    if pos is not None:
        # The positive starts the running state: m = its logit, l = exp(0) = 1, acc = k⁺.
        acc = pos.to(acc_dtype).clone()
        m = (scaled_x * acc).sum(-1)
        l = torch.ones(rows, dtype=acc_dtype, device=x.device)
    else:
        acc = torch.zeros(rows, dim, dtype=acc_dtype, device=x.device)
        m = torch.full((rows,), -torch.inf, dtype=acc_dtype, device=x.device)
        l = torch.zeros(rows, dtype=acc_dtype, device=x.device)
    for start in range(0, bank.shape[0], chunk_size):
        b = bank[start : start + chunk_size].to(acc_dtype)  # (c, D)
        z = scaled_x @ b.T  # (R, c)
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = torch.exp(m - m_new)  # rescales the old state; exp(-inf) = 0 on the first chunk
        p = torch.exp(z - m_new[:, None])
        l = l * alpha + p.sum(dim=1)
        acc = acc * alpha[:, None] + p @ b
        m = m_new
    return m + torch.log(l), acc / l[:, None]


def bank_softmax_stats_triton(
    x: torch.Tensor, inv_tau: torch.Tensor, bank: torch.Tensor, pos: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused split-K Triton kernel (see :mod:`fastssl.kernels.bank_softmax_stats`)."""
    from fastssl.kernels.bank_softmax_stats import bank_softmax_stats as launch

    return launch(
        x.contiguous(), inv_tau.float().contiguous(), bank.contiguous(), None if pos is None else pos.contiguous()
    )


@torch.library.custom_op("fastssl::bank_softmax_stats", mutates_args=())
def _bank_softmax_stats_op(
    x: torch.Tensor, inv_tau: torch.Tensor, bank: torch.Tensor, pos: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return bank_softmax_stats_triton(x, inv_tau, bank, pos)
    return bank_softmax_stats_streaming(x, inv_tau, bank, pos)


@_bank_softmax_stats_op.register_fake
def _(x, inv_tau, bank, pos, backend):
    acc_dtype = accumulation_dtype(x, bank)
    return x.new_empty(x.shape[0], dtype=acc_dtype), x.new_empty(x.shape, dtype=acc_dtype)


def bank_softmax_stats(
    x: torch.Tensor,
    inv_tau: torch.Tensor,
    bank: torch.Tensor,
    pos: torch.Tensor | None = None,
    *,
    backend: str = "streaming",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row LSE and μ against the bank, by the streaming or Triton backend (module docstring for the math).

    Registered as the torch.library op ``fastssl::bank_softmax_stats`` so that ``torch.compile`` treats it as one
    opaque node; eager calls skip the dispatcher (its first use imports the compiler stack, ~170 MB). No autograd:
    callers build the gradient from μ (see the loss ops).

    Args:
        x: (R, D) query rows.
        inv_tau: (R,) inverse temperatures.
        bank: (K, D) bank rows.
        pos: optional (R, D) positive keys.
        backend: ``"streaming"`` or ``"triton"`` (already resolved).

    Returns:
        (lse (R,), mu (R, D)) in the accumulation dtype.
    """
    if backend not in ("streaming", "triton"):
        raise ValueError(f"bank_softmax_stats runs the streaming or triton backend, got {backend!r}")
    if torch.compiler.is_compiling():
        return _bank_softmax_stats_op(x, inv_tau, bank, pos, backend)
    if backend == "triton":
        return bank_softmax_stats_triton(x, inv_tau, bank, pos)
    return bank_softmax_stats_streaming(x, inv_tau, bank, pos)
