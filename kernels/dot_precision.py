r"""How the bank kernels multiply queries by a bank of another precision on tensor cores.

The public functions L2-normalise queries in fp32 (rounding a unit vector to fp16 moves a τ = 0.01 logit by ~1e-2),
while banks are usually stored in fp16 or bf16. Upcasting the bank tile to fp32 would make every dot an fp32 dot
(3xTF32, about 6x the fp16 tensor-core time). Instead the fp32 query is split into 16-bit terms in the bank's dtype,

    x = hi + lo / L + lo2 / L^2,   hi = fp16(x),  lo = fp16((x - hi)·L),  ...

with L a power of two (2^11 for fp16, so the residual, ≤ 2^-11·|x|, is lifted out of the fp16 subnormal range;
2^8 for bf16), and x·b is evaluated by Horner's rule with fp32 accumulation,

    s = ((hi·b)·L + lo·b)·L + lo2·b) / L^2,

every term an exact 16-bit × 16-bit product. Two fp16 terms (or three bf16 terms) represent x to ~2^-22 relative,
i.e. fp32 accuracy, for twice (three times) the cost of a plain 16-bit dot. Banks that are exactly representable
in the bank dtype lose nothing.

Plans (x dtype, bank dtype) -> (dot dtype, terms):
    fp16 x fp16, bf16 x bf16   -> 16-bit, 1 term
    fp32 x fp16 / bf16         -> 16-bit, 2 / 3 terms
    anything else              -> fp32 (3xTF32 unless TF32 is allowed), 1 term
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "DotPlan",
    "dot_plan",
    "split_query",
    "query_dot",
    "chunked_query_dot",
    "block_d_chunk",
    "config_tag",
    "device_arch",
    "table_config",
    "FP32_PRECISION",
]

# Tensor-core precision of fp32 dots unless TF32 is allowed: three TF32 products recover fp32 accuracy, while "ieee"
# (FMA) holds whole D-long operand rows per thread and spills at D >= 128.
FP32_PRECISION = "tf32x3"

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class DotPlan:
    """Compile-time description of the query·bank dot."""

    compute_dtype: torch.dtype  # dtype of both tensor-core operands
    x_terms: int  # 16-bit terms the query is split into (1: no split)
    lo_scale: float  # L, the power of two lifting each residual term
    input_precision: str  # tl.dot input_precision (matters for fp32 operands only)

    @property
    def config_class(self) -> str:
        """Config-table column: "16" plain 16-bit, "32x16" split fp32 queries over a 16-bit bank, "32" fp32."""
        if self.compute_dtype == torch.float32:
            return "32"
        return "16" if self.x_terms == 1 else "32x16"

    def constexprs(self) -> dict:
        return {
            "COMPUTE_DTYPE": _TL_DTYPE[self.compute_dtype],
            "X_TERMS": self.x_terms,
            "LO_SCALE": self.lo_scale,
            "INPUT_PRECISION": self.input_precision,
        }


def dot_plan(x_dtype: torch.dtype, bank_dtype: torch.dtype, allow_tf32: bool = False) -> DotPlan:
    """The :class:`DotPlan` for queries of ``x_dtype`` against a bank of ``bank_dtype``."""
    for dtype in (x_dtype, bank_dtype):
        if dtype not in _TL_DTYPE:
            raise TypeError(f"inputs must be fp16, bf16 or fp32, got {dtype}")
    if x_dtype == bank_dtype and bank_dtype != torch.float32:
        return DotPlan(bank_dtype, 1, 1.0, "tf32")
    if x_dtype == torch.float32 and bank_dtype == torch.float16:
        return DotPlan(torch.float16, 2, 2048.0, "tf32")
    if x_dtype == torch.float32 and bank_dtype == torch.bfloat16:
        return DotPlan(torch.bfloat16, 3, 256.0, "tf32")
    return DotPlan(torch.float32, 1, 1.0, "tf32" if allow_tf32 else FP32_PRECISION)


def device_arch(device: torch.device) -> int:
    """Compute capability as an int (90 for sm_90); 80 for CPU tensors (the interpreter ignores it).

    The kernels' config tables depend on it: tensor-core instructions differ (mma on sm_80, wgmma on sm_90), and so
    do the tile sizes that fit in registers."""
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def table_config(op: str, d: int, plan: DotPlan, arch: int, table: dict, sm90_table: dict):
    """A kernel's launch configuration from its deterministic tables, keyed by (BLOCK_D, plan.config_class).

    BLOCK_D is D rounded up to a power of two, at least 16 (the tensor-core reduction minimum). ``table`` holds for
    sm_80 and up; ``sm90_table`` overrides it on sm_90 only, where its entries were measured (they may spill
    elsewhere). A key missing from ``table`` is an fp32 bank wider than the kernels serve.
    """
    block_d = max(16, triton.next_power_of_2(d))
    if block_d > 512:
        raise ValueError(f"{op} supports D <= 512, got D={d}")
    key = (block_d, plan.config_class)
    if key not in table:
        raise NotImplementedError(
            f"{op}: fp32 banks are supported up to D=128 (got D={d}); store the bank in fp16/bf16 or use the "
            "streaming backend"
        )
    return sm90_table.get(key, table[key]) if arch == 90 else table[key]


def block_d_chunk(block_dc: int, block_d: int) -> int:
    """BLOCK_DC constexpr of a kernel that can stream its query tile in D-chunks: ``block_dc`` (a power of two ≥ 16)
    capped at ``block_d``; 0 means the whole row (BLOCK_DC == BLOCK_D keeps the query tile in registers)."""
    if block_dc and (block_dc < 16 or block_dc & (block_dc - 1)):
        raise ValueError(f"block_dc must be 0 (whole row) or a power of two >= 16, got {block_dc}")
    return min(block_dc, block_d) if block_dc else block_d


def config_tag(config) -> str:
    """Name suffix of an explicitly given (candidate) launch config in a kernel's ``aot_specs``; "" for the table's."""
    return "" if config is None else ",cfg=" + "-".join(str(v) for v in astuple(config))


@triton.jit
def split_query(x, COMPUTE_DTYPE: tl.constexpr, X_TERMS: tl.constexpr, LO_SCALE: tl.constexpr):
    """(hi, lo, lo2) operand tiles of query tile ``x`` (unused terms are copies of hi)."""
    hi = x.to(COMPUTE_DTYPE)
    lo = hi
    lo2 = hi
    if X_TERMS >= 2:
        residual = (x.to(tl.float32) - hi.to(tl.float32)) * LO_SCALE
        lo = residual.to(COMPUTE_DTYPE)
        if X_TERMS >= 3:
            lo2 = ((residual - lo.to(tl.float32)) * LO_SCALE).to(COMPUTE_DTYPE)
    return hi, lo, lo2


@triton.jit
def query_dot(
    hi,
    lo,
    lo2,
    bank_t,
    X_TERMS: tl.constexpr,
    LO_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """fp32 (rows, cols) tile of x·bᵀ from the split query terms and a transposed bank tile (Horner's rule)."""
    s = tl.dot(hi, bank_t, input_precision=INPUT_PRECISION)
    if X_TERMS >= 2:
        s = tl.dot(lo, bank_t, s * LO_SCALE, input_precision=INPUT_PRECISION)
        if X_TERMS >= 3:
            s = tl.dot(lo2, bank_t, s * LO_SCALE, input_precision=INPUT_PRECISION)
            s = s * (1.0 / (LO_SCALE * LO_SCALE))
        else:
            s = s * (1.0 / LO_SCALE)
    return s


@triton.jit
def chunked_query_dot(
    x_ptr,  # (rows, D) fp16/bf16/fp32 query rows
    rows,  # (BLOCK_ROWS,) int64 row indices of the tile
    row_ok,  # (BLOCK_ROWS,) row mask
    stride_x,
    bank_ptr,  # (K, D) bank
    offs_k,  # (BLOCK_K,) bank row indices of the tile
    k_ok,  # (BLOCK_K,) bank row mask
    stride_bank,
    D,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    X_TERMS: tl.constexpr,
    LO_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """fp32 (BLOCK_ROWS, BLOCK_K) tile x·bᵀ streamed over D in chunks of BLOCK_DC (query and bank chunks loaded and the
    query split per chunk), for tiles whose whole-row split query would not fit in registers.

    Each 16-bit term keeps its own tensor-core accumulator over the chunks, and the terms are combined once at the end
    by the same Horner's rule as :func:`query_dot`: ((Σhi·b)·L + Σlo·b)/L, so the result has the whole-row accuracy."""
    acc_hi = tl.zeros((BLOCK_ROWS, BLOCK_K), tl.float32)
    acc_lo = tl.zeros((BLOCK_ROWS, BLOCK_K), tl.float32)
    acc_lo2 = tl.zeros((BLOCK_ROWS, BLOCK_K), tl.float32)
    bank_rows = offs_k.to(tl.int64)
    for d0 in range(0, D, BLOCK_DC):
        offs_dc = d0 + tl.arange(0, BLOCK_DC)
        dc_ok = offs_dc < D
        x_c = tl.load(
            x_ptr + rows[:, None] * stride_x + offs_dc[None, :], mask=row_ok[:, None] & dc_ok[None, :], other=0.0
        )
        hi, lo, lo2 = split_query(x_c, COMPUTE_DTYPE, X_TERMS, LO_SCALE)
        bank_t = tl.trans(
            tl.load(
                bank_ptr + bank_rows[:, None] * stride_bank + offs_dc[None, :],
                mask=k_ok[:, None] & dc_ok[None, :],
                other=0.0,
            ).to(COMPUTE_DTYPE)
        )
        acc_hi = tl.dot(hi, bank_t, acc_hi, input_precision=INPUT_PRECISION)
        if X_TERMS >= 2:
            acc_lo = tl.dot(lo, bank_t, acc_lo, input_precision=INPUT_PRECISION)
        if X_TERMS >= 3:
            acc_lo2 = tl.dot(lo2, bank_t, acc_lo2, input_precision=INPUT_PRECISION)
    s = acc_hi
    if X_TERMS == 2:
        s = (acc_hi * LO_SCALE + acc_lo) * (1.0 / LO_SCALE)
    if X_TERMS >= 3:
        s = ((acc_hi * LO_SCALE + acc_lo) * LO_SCALE + acc_lo2) * (1.0 / (LO_SCALE * LO_SCALE))
    return s
