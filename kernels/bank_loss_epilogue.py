r"""Loss epilogue of the bank softmax losses: per-row loss and the gradient with respect to the RAW embeddings.

Derivation
----------
After :mod:`unit_rows` (x̂ = [â; b̂] normalized, norms ‖a_r‖) and :mod:`bank_softmax_stats` (per-row LSE and μ), row r of
the batch (r < N) has, with ρ(·) the optional rounding of query values to the bank's 16-bit dtype
(``query_precision="bank"``) and β_a = 1/τ_a, β_b = 1/τ_b:

    InfoNCE (MoCo):  v_r = ρ(b̂_r) (the positive key)       ℓ_r = lse_r − β_a·ρ(â_r)·v_r
    soft CE (ISD, ReSSL): v_r = μ_{N+r} (teacher's mean)    ℓ_r = lse_r − β_a·ρ(â_r)·v_r
                                                    (KL: ℓ_r −= lse_{N+r} − β_b·ρ(b̂_r)·v_r)
    g_r = (μ_r − v_r)·c                              (∂ℓ/∂â_r times c = β_a, or β_a/N for a batch mean)

(derivations of ℓ and g in fastssl.ops.bank_info_nce and fastssl.ops.soft_bank_cross_entropy). The gradient with
respect to the raw row a_r applies the normalization's Jacobian (vector-Jacobian product of x / max(‖x‖, ε)):

    ∂/∂a_r = (g_r − â_r (â_r·g_r)) / ‖a_r‖   if ‖a_r‖ ≥ ε,   g_r / ε   otherwise.

One launch replaces about a dozen small eager launches (the loss rows, the gradient and the Jacobian).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["bank_loss_epilogue", "aot_specs"]

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _bank_loss_epilogue_kernel(
    x_ptr,  # (2N, D) fp32 normalized rows [â; b̂]
    norm_ptr,  # (≥ N,) fp32 norms ‖a_r‖
    lse_ptr,  # (N,) InfoNCE or (2N,) soft CE, fp32
    mu_ptr,  # (N, D) InfoNCE or (2N, D) soft CE, fp32
    loss_ptr,  # (N,) fp32 out: ℓ_r
    grad_ptr,  # (N, D) fp32 out: ∂/∂a_r
    N,
    D,
    beta_a,  # fp32 scalars: 1/τ_a, 1/τ_b, gradient scale c
    beta_b,
    grad_scale,
    SOFT_CE: tl.constexpr,  # v = μ_{N+r} (soft CE) instead of the positive ρ(b̂_r) (InfoNCE)
    KL: tl.constexpr,  # soft CE: subtract the teacher entropy
    ROUND_DTYPE: tl.constexpr,  # ρ: the 16-bit dtype query values are rounded to, or tl.float32 (no rounding)
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < N
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    rows = offs_r.to(tl.int64)
    tile = rows[:, None] * D + offs_d[None, :]
    second = (rows + N)[:, None] * D + offs_d[None, :]  # row N + r (int64; N may be specialised to the constant 1)

    a_hat = tl.load(x_ptr + tile, mask=mask, other=0.0)
    a_round = a_hat.to(ROUND_DTYPE).to(tl.float32)
    mu = tl.load(mu_ptr + tile, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + offs_r, mask=row_ok, other=0.0)
    # -- phase 1: the reference vector v and the loss row
    if SOFT_CE:
        v = tl.load(mu_ptr + second, mask=mask, other=0.0)
    else:
        v = tl.load(x_ptr + second, mask=mask, other=0.0).to(ROUND_DTYPE).to(tl.float32)
    loss = lse - tl.sum(a_round * v, axis=1) * beta_a
    if SOFT_CE and KL:
        b_round = tl.load(x_ptr + second, mask=mask, other=0.0).to(ROUND_DTYPE).to(tl.float32)
        lse_b = tl.load(lse_ptr + N + offs_r, mask=row_ok, other=0.0)
        loss = loss - (lse_b - tl.sum(b_round * v, axis=1) * beta_b)
    tl.store(loss_ptr + offs_r, loss, mask=row_ok)
    # -- phase 2: gradient w.r.t. â, then through the normalization (unrounded â: the rounding is straight-through)
    g = (mu - v) * grad_scale
    norm = tl.load(norm_ptr + offs_r, mask=row_ok, other=1.0)
    radial = tl.where(norm >= 1e-12, tl.sum(g * a_hat, axis=1), 0.0)
    grad = tl.div_rn(g - a_hat * radial[:, None], tl.maximum(norm, 1e-12)[:, None])
    tl.store(grad_ptr + tile, grad, mask=mask)


def _block_r(block_d: int) -> int:
    """Rows per program: about 4096 elements of each (rows, D) tile in flight."""
    return max(1, min(64, 4096 // block_d))


def aot_specs(d: int, x_dtype: torch.dtype, bank_dtype: torch.dtype, arch: int = 80) -> list[dict]:
    """The variants a launch of width ``d`` compiles: InfoNCE, soft CE and soft-CE KL, rounding queries to the bank's
    16-bit dtype (``query_precision="bank"``) where ``x_dtype`` is 16-bit (same dict layout as the bank kernels'
    ``aot_specs``; one fixed configuration, which the architecture does not change)."""
    block_d = max(16, triton.next_power_of_2(d))
    round_dtype = _TL_DTYPE[x_dtype if x_dtype != torch.float32 else torch.float32]
    signature = {
        "x_ptr": "*fp32", "norm_ptr": "*fp32", "lse_ptr": "*fp32", "mu_ptr": "*fp32", "loss_ptr": "*fp32",
        "grad_ptr": "*fp32", "N": "i32", "D": "i32", "beta_a": "fp32", "beta_b": "fp32", "grad_scale": "fp32",
        "SOFT_CE": "constexpr", "KL": "constexpr", "ROUND_DTYPE": "constexpr", "BLOCK_R": "constexpr",
        "BLOCK_D": "constexpr",
    }  # fmt: skip
    specs = []
    for soft_ce, kl, n_one in ((False, False, False), (True, False, False), (True, True, False), (True, True, True)):
        # n_one: a batch of one row, which Triton's JIT specialises to the constant N = 1
        constexprs = {"SOFT_CE": soft_ce, "KL": kl, "ROUND_DTYPE": round_dtype, "BLOCK_R": _block_r(block_d)}
        constexprs.update({"BLOCK_D": block_d, **({"N": 1} if n_one else {})})
        specs.append(
            {
                "name": f"epilogue[D={d},soft_ce={soft_ce},kl={kl},round={str(x_dtype)[6:]}{',N=1' if n_one else ''}]",
                "fn": _bank_loss_epilogue_kernel,
                "signature": {**signature, **({"N": "constexpr"} if n_one else {})},
                "constexprs": constexprs,
                "attrs": {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 7)},
                "num_warps": 4,
                "num_stages": 1,
            }
        )
    return specs


def bank_loss_epilogue(
    x_hat: torch.Tensor,
    norm: torch.Tensor,
    lse: torch.Tensor,
    mu: torch.Tensor,
    beta_a: float,
    beta_b: float,
    grad_scale: float,
    *,
    soft_ce: bool,
    kl: bool = False,
    round_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and raw-embedding gradient of a bank loss, from the prologue's and the statistics' outputs.

    Args:
        x_hat: (2N, D) fp32 normalized rows [â; b̂] (:func:`unit_rows.unit_rows`), contiguous.
        norm: (≥ N,) fp32 norms of the raw rows a (the first N are used).
        lse, mu: statistics of the stats kernel: (N,), (N, D) for InfoNCE (queries ρ(â), positives ρ(b̂)); (2N,),
            (2N, D) for soft CE (rows [ρ(â); ρ(b̂)]); fp32, contiguous.
        beta_a, beta_b: 1/τ of the a rows and of the b rows (b only for the KL term).
        grad_scale: c in g = (μ_r − v_r)·c.
        soft_ce: soft cross-entropy (ISD, ReSSL) instead of InfoNCE.
        kl: soft CE only: KL(p‖q) = CE − H(p).
        round_dtype: the 16-bit dtype query values were rounded to for the stats (``query_precision="bank"``).

    Returns:
        loss: (N,) fp32 per-row loss ℓ_r.
        grad: (N, D) fp32 (g_r − â_r (â_r·g_r)) / ‖a_r‖ with g_r = (μ_r − v_r)·c: for c = β_a/N (or β_a) the gradient
            of the mean (or sum) of ℓ with respect to the raw rows a_r.
    """
    n2, d = x_hat.shape
    n = n2 // 2
    rows = 2 * n if soft_ce else n
    if n2 != 2 * n or x_hat.dtype != torch.float32 or not x_hat.is_contiguous():
        raise ValueError(f"x_hat must be a contiguous fp32 (2N, D) tensor, got {tuple(x_hat.shape)} {x_hat.dtype}")
    if lse.shape != (rows,) or mu.shape != (rows, d) or norm.shape[0] < n:
        raise ValueError(
            f"lse/mu/norm shapes {tuple(lse.shape)}, {tuple(mu.shape)}, {tuple(norm.shape)} do not fit N={n}, D={d}"
        )
    loss = torch.empty(n, dtype=torch.float32, device=x_hat.device)
    grad = torch.empty(n, d, dtype=torch.float32, device=x_hat.device)
    if n == 0:
        return loss, grad
    block_d = max(16, triton.next_power_of_2(d))
    block_r = _block_r(block_d)
    _bank_loss_epilogue_kernel[(triton.cdiv(n, block_r),)](
        x_hat, norm, lse.contiguous(), mu.contiguous(), loss, grad, n, d,
        float(beta_a), float(beta_b), float(grad_scale),
        SOFT_CE=soft_ce, KL=kl and soft_ce, ROUND_DTYPE=_TL_DTYPE[round_dtype or torch.float32],
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return loss, grad
