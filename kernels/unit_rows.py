r"""Loss prologue: L2-normalize two sets of embedding rows into one stacked buffer, with their norms and temperatures.

Derivation
----------
Rows a_0 … a_{R_a-1} and b_0 … b_{R_b-1} (e.g. student and teacher, or queries and positive keys) become

    out_r = x_r / max(‖x_r‖, ε),   x = [a; b]   (ε = 1e-12, as F.normalize)
    norm_r = ‖x_r‖,   inv_tau_r = t_a for r < R_a, t_b otherwise

computed in fp32 from rows of any float dtype. One launch replaces the norm, clamp, divide of each set, the
concatenation and the temperature vector of the bank losses' eager prologue (seven small launches for MoCo, nine
for ISD/ReSSL). The norms let the
loss epilogue apply the normalization's Jacobian (:mod:`bank_loss_epilogue`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["unit_rows", "aot_specs", "EPS"]

EPS = 1e-12  # F.normalize's default


@triton.jit
def _unit_rows_kernel(
    a_ptr,  # (R_a, D) first rows, fp16/bf16/fp32
    b_ptr,  # (R_b, D) second rows, fp16/bf16/fp32
    out_ptr,  # (R_a + R_b, D) fp32 out: normalized rows, stacked
    norm_ptr,  # (R_a + R_b,) fp32 out: row norms
    inv_tau_ptr,  # (R_a + R_b,) fp32 out: per-row inverse temperature
    R_a,
    R_b,
    D,
    stride_a,
    stride_b,
    inv_tau_a,  # fp32 scalars
    inv_tau_b,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    in_a = offs_r < R_a
    in_b = (offs_r >= R_a) & (offs_r < R_a + R_b)
    rows_a = offs_r.to(tl.int64)
    rows_b = tl.where(in_b, offs_r - R_a, 0).to(tl.int64)
    # -- each row comes from exactly one of the two inputs (masked loads, the other contributes 0)
    x = tl.load(a_ptr + rows_a[:, None] * stride_a + offs_d[None, :], mask=in_a[:, None] & d_ok[None, :], other=0.0)
    x = x.to(tl.float32) + tl.load(
        b_ptr + rows_b[:, None] * stride_b + offs_d[None, :], mask=in_b[:, None] & d_ok[None, :], other=0.0
    ).to(tl.float32)
    # IEEE sqrt and division (tl.sqrt / `/` compile to sqrt.approx / div.full on NVIDIA GPUs), as F.normalize
    norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
    out = tl.div_rn(x, tl.maximum(norm, 1e-12)[:, None])
    row_ok = in_a | in_b
    tl.store(out_ptr + rows_a[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(norm_ptr + offs_r, norm, mask=row_ok)
    tl.store(inv_tau_ptr + offs_r, tl.where(in_a, inv_tau_a, inv_tau_b), mask=row_ok)


def _block_r(block_d: int) -> int:
    """Rows per program: about 4096 elements in flight."""
    return max(1, min(64, 4096 // block_d))


_TRITON_TYPE = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def aot_specs(d: int, x_dtype: torch.dtype, bank_dtype: torch.dtype, arch: int = 80) -> list[dict]:
    """The variant a launch with ``x_dtype`` rows of width ``d`` compiles (same dict layout as the bank kernels'
    ``aot_specs``; one fixed configuration, which the bank dtype and architecture do not change)."""
    block_d = max(16, triton.next_power_of_2(d))
    signature = {
        "a_ptr": _TRITON_TYPE[x_dtype], "b_ptr": _TRITON_TYPE[x_dtype], "out_ptr": "*fp32", "norm_ptr": "*fp32",
        "inv_tau_ptr": "*fp32", "R_a": "i32", "R_b": "i32", "D": "i32", "stride_a": "i32", "stride_b": "i32",
        "inv_tau_a": "fp32", "inv_tau_b": "fp32", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr",
    }  # fmt: skip
    return [
        {
            "name": f"unit_rows[D={d},x={str(x_dtype)[6:]}]",
            "fn": _unit_rows_kernel,
            "signature": signature,
            "constexprs": {"BLOCK_R": _block_r(block_d), "BLOCK_D": block_d},
            "attrs": {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 7, 8, 9)},
            "num_warps": 4,
            "num_stages": 1,
        }
    ]


def unit_rows(
    a: torch.Tensor, b: torch.Tensor, inv_tau_a: float, inv_tau_b: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized rows of ``a`` and ``b`` stacked, their norms and per-row inverse temperatures, in one launch.

    Args:
        a: (R_a, D) fp16/bf16/fp32 rows, last dim contiguous.
        b: (R_b, D) fp16/bf16/fp32 rows of the same width and device (the dtypes may differ).
        inv_tau_a, inv_tau_b: inverse temperature written for the rows of ``a`` and of ``b``.

    Returns:
        x̂: (R_a + R_b, D) fp32 normalized rows ``[a; b] / max(‖row‖, 1e-12)``.
        norm: (R_a + R_b,) fp32 row norms ‖row‖.
        inv_tau: (R_a + R_b,) fp32, ``inv_tau_a`` then ``inv_tau_b``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be (R, D) with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in _TRITON_TYPE or b.dtype not in _TRITON_TYPE:
        raise TypeError(f"a and b must be fp16, bf16 or fp32, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device}, b on {b.device}")
    r_a, r_b, d = a.shape[0], b.shape[0], a.shape[1]
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    out = torch.empty(r_a + r_b, d, dtype=torch.float32, device=a.device)
    norm = torch.empty(r_a + r_b, dtype=torch.float32, device=a.device)
    inv_tau = torch.empty(r_a + r_b, dtype=torch.float32, device=a.device)
    if r_a + r_b == 0:
        return out, norm, inv_tau
    block_d = max(16, triton.next_power_of_2(d))
    block_r = _block_r(block_d)
    _unit_rows_kernel[(triton.cdiv(r_a + r_b, block_r),)](
        a, b, out, norm, inv_tau, r_a, r_b, d, a.stride(0), b.stride(0), float(inv_tau_a), float(inv_tau_b),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out, norm, inv_tau
