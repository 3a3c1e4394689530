r"""Bank softmax statistics: per-row log-sum-exp and softmax-weighted mean of a memory bank, in one streaming pass.

Derivation
----------
Row r of R query rows (student and teacher rows stacked, or InfoNCE queries) has the logits

    z_{r,0} = t_r · x_r·p_r            (only when a positive p_r is given)
    z_{r,j} = t_r · x_r·b_j,  j < K    (b_j: bank rows, t_r = 1/τ_r)

and with the values v = [p_r, b_0, ..., b_{K-1}] the op returns

    lse_r = log Σ_j exp(z_{r,j})        μ_r = Σ_j softmax(z_r)_j · v_j.

This is attention with a single query per row and V = K = bank, so the FlashAttention forward recurrence applies.
Working in base 2 with s = z·log2(e) (log2(e) folded into the per-row scale t_r·log2(e), so the exponential is a
bare ``exp2``), a block of bank rows B updates the running max m, normaliser l and unnormalised mean acc as

    m' = max(m, max_j s_j),  α = 2^(m - m'),  P_j = 2^(s_j - m'),
    l' = α·l + Σ_j P_j,      acc' = α·acc + P·B.

All terms are ≤ 1 after subtracting the running max, so no τ (down to 0.01, |s| ≤ 144 for unit vectors) overflows.

Split-K: the bank is cut into ``num_splits`` contiguous ranges; program (row block, split) runs the recurrence over
its range and writes a partial triple (m_s, l_s, acc_s). A second kernel merges the triples of a row in a fixed order
(no atomics, so results are bitwise reproducible for a fixed launch configuration):

    M = max_s m_s,  w_s = 2^(m_s - M),  L = Σ_s w_s·l_s,  lse = ln2·(M + log2 L),  μ = Σ_s w_s·acc_s / L.

The positive, when given, is folded in as the initial state of split 0: m = s_pos, l = 1, acc = p_r. Splits whose
range is empty keep m = -inf, l = 0, acc = 0 and get weight 0 in the merge; K = 0 is therefore valid with a positive.

Precision: the logits dot runs on tensor cores with fp32 accumulation, in the bank's dtype: fp32 queries over a
16-bit bank are split into 16-bit terms so x·b keeps fp32 accuracy (see :mod:`dot_precision`); fp32 banks use 3xTF32
unless ``allow_tf32``. P is rounded to the bank's dtype for the second dot, as in FlashAttention; for fp16 it is
first scaled by 2^15 (undone exactly on store) so weights down to 2^-39 instead of 2^-24 survive the fp16 subnormal
range. Mixed 16-bit dtypes (fp16 queries, bf16 bank) or 16-bit queries over an fp32 bank compute in fp32.

Launch configuration: a fixed table keyed by D and dot plan (no runtime autotuning, whose per-process choice would
change the summation order), split count from the SM count: row blocks × splits ≈ 2 programs per SM, at least
8 bank blocks per split. Row blocks are the fastest grid axis, so programs of one split run together and read each
bank tile once from HBM, the other row blocks hitting L2.

D-chunked logits (config ``block_dc``): by default the (split) query tile is loaded once and stays in registers for
the whole scan. At D = 512 that tile (BLOCK_R × 512 × 2 fp16 terms) competes with the BLOCK_R × 512 fp32 μ
accumulator and forces 16-row blocks; with ``block_dc`` < BLOCK_D, s = x·bᵀ is accumulated chunk by chunk
(:func:`dot_precision.chunked_query_dot`: query and bank chunks loaded per chunk, each 16-bit term in its own
accumulator), which frees those registers and the shared memory of the whole-row operand tiles. The price: the full
bank tile for P·B is loaded as well (the chunks re-read it from L1/L2), and since the chunk loop is then the innermost
loop, only its loads are software-pipelined.

Invalid (not yet written) bank rows are excluded by passing only the valid rows (``MemoryBank.keys``); bank offsets
are int64 so banks up to 2^24 × 512 elements and beyond are addressed correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dot_precision import (
    DotPlan,
    block_d_chunk,
    chunked_query_dot,
    config_tag,
    device_arch,
    dot_plan,
    query_dot,
    split_query,
    table_config,
)

__all__ = [
    "bank_softmax_stats",
    "StatsConfig",
    "CONFIGS",
    "CONFIGS_SM90",
    "CANDIDATES_SM90",
    "pick_config",
    "num_splits_for",
    "aot_specs",
]


# Largest number of bank splits; bounds the partial buffers (splits × R × D fp32) and the merge tile.
MAX_SPLITS = 256
# A split should stream at least this many bank blocks, or the merge dominates.
MIN_BLOCKS_PER_SPLIT = 8


@dataclass(frozen=True)
class StatsConfig:
    """Launch configuration of the partial kernel."""

    block_r: int
    block_k: int
    num_warps: int
    num_stages: int
    block_dc: int = 0  # D-chunk of the logits dot; 0: the whole row (query tile held in registers for the whole scan)


# Deterministic config table keyed by (BLOCK_D, DotPlan.config_class): "16" plain 16-bit, "32x16" fp32 queries split
# over a 16-bit bank, "32" fp32. A table instead of runtime autotuning keeps the reduction order, hence the bits of the
# result, identical across processes. The D = 128 and 512 entries are compiled for sm_80, sm_86, sm_89 and sm_90 and
# checked for register spills and shared memory by tests/test_kernels_aot.py; D = 32, 64, 256 were checked once for
# sm_80/sm_90 (D = 16 was not). fp32 banks are limited to D <= 128: the fp32 operand tiles of wider rows spill at every
# tile size tried (3xTF32 and IEEE alike). This table holds for sm_80 and up; CONFIGS_SM90 overrides it on Hopper with
# the fastest configs of benchmarks/gpu_check.py's sweep on an H100 (R = 512, K = 2^20:
# benchmarks/results/nvidia-h100-80gb-hbm3/kernel_configs.md), which spill on sm_80. D = 128 (64, 64, 4, 3) was
# second-fastest there (0.81 ms vs 0.76 ms with fp32 queries); D = 256 and the smaller dims are not measured. At
# D = 512 the whole-row fp16-query and fp32-over-bf16 tiles need 100 and 114 KB of shared memory, over the 99 KB of
# sm_86/sm_89 (A10, L4, RTX 30/40), so this table streams the logits in D-chunks of 64 there (76–78 KB, no spills on
# sm_80/86/89; not measured on any GPU), while the H100 keeps its measured entries. Triton 3.6 (the H100 image's
# compiler) spills where 3.8 does not: the fp32-bank entry (32 rows: 8-48 bytes) and the D = 512 fp32-query sm_8x entry
# with 4 warps (8-128 bytes) were replaced by 16 rows and 8 warps, clean under both; the H100's measured D = 512
# fp32-query entry spills 112-128 bytes under 3.6 (its 12.2 ms includes them), so its 8-warp variant is a candidate.
CONFIGS: dict[tuple[int, str], StatsConfig] = {
    **{(bd, "16"): StatsConfig(64, 64, 4, 3) for bd in (16, 32, 64)},
    (128, "16"): StatsConfig(64, 64, 4, 3),
    (256, "16"): StatsConfig(64, 64, 8, 2),
    (512, "16"): StatsConfig(32, 64, 8, 2, 64),
    **{(bd, "32x16"): StatsConfig(64, 64, 4, 3) for bd in (16, 32, 64)},
    (128, "32x16"): StatsConfig(64, 64, 4, 3),
    (256, "32x16"): StatsConfig(64, 64, 8, 2),
    (512, "32x16"): StatsConfig(16, 64, 8, 2, 64),
    **{(bd, "32"): StatsConfig(16, 32, 8, 2) for bd in (16, 32, 64, 128)},
}
CONFIGS_SM90: dict[tuple[int, str], StatsConfig] = {
    (128, "16"): StatsConfig(64, 128, 4, 3),
    (128, "32x16"): StatsConfig(128, 128, 8, 3),
    (512, "16"): StatsConfig(64, 64, 8, 2),
    (512, "32x16"): StatsConfig(16, 64, 4, 2),  # whole row, as measured (12.2 ms in the sweep)
}
# Not yet measured, so not in the tables: D-chunked logits free the registers of the split fp32 query tile, so 64-row
# blocks fit next to the 64 × 512 fp32 μ accumulator without spilling on sm_90 (255 registers, 128 KB shared; the
# whole-row tile at 64 rows needs 256 KB of shared memory and failed with OutOfResources on the H100). Fp32 queries
# take chunks of 32 (chunks of 64 spill 16 bytes). Caveat: the chunk loop becomes the innermost loop, so Triton
# pipelines only its loads; the full bank tile for P·B is a plain load, re-read from L1/L2 next to the chunks, and the
# pipeline drains at every bank tile. Whether 4× the rows per block outweighs that is what the sweep measures.
# tests/test_kernels_aot.py compiles each for sm_90 and checks for spills; benchmarks/gpu_check.py's sweep times them
# next to the table entries, and the faster ones move into CONFIGS_SM90.
CANDIDATES_SM90: dict[tuple[int, str], list[StatsConfig]] = {
    (512, "32x16"): [StatsConfig(64, 64, 8, 2, 32), StatsConfig(16, 64, 8, 2)],
    (512, "16"): [StatsConfig(64, 64, 8, 2, 64)],
}


def block_d_for(d: int) -> int:
    """Feature tile: D rounded up to a power of two, at least 16 (the tensor-core reduction minimum)."""
    return max(16, triton.next_power_of_2(d))


def pick_config(d: int, plan: DotPlan, arch: int = 80) -> StatsConfig:
    """Launch configuration for feature dim ``d``, the dot plan and compute capability ``arch`` (e.g. 90)."""
    return table_config("bank_softmax_stats", d, plan, arch, CONFIGS, CONFIGS_SM90)


def num_splits_for(r: int, k: int, block_r: int, block_k: int, num_sms: int) -> int:
    """Bank splits so that row blocks × splits gives about two programs per SM, each streaming enough blocks."""
    row_blocks = triton.cdiv(r, block_r)
    k_blocks = triton.cdiv(k, block_k)
    target = triton.cdiv(2 * num_sms, row_blocks)
    return max(1, min(target, triton.cdiv(k_blocks, MIN_BLOCKS_PER_SPLIT), MAX_SPLITS))


@triton.jit
def _bank_softmax_stats_partial_kernel(
    x_ptr,  # (R, D) queries
    pos_ptr,  # (R, D) positives (unused unless HAS_POS)
    bank_ptr,  # (K, D) bank
    inv_tau_ptr,  # (R,) fp32, 1/τ per row
    m_part_ptr,  # (S, R) fp32 out: running max, base-2 logits
    l_part_ptr,  # (S, R) fp32 out: normaliser
    acc_part_ptr,  # (S, R, D) fp32 out: unnormalised mean
    R,
    K,
    D,
    stride_x,
    stride_pos,
    stride_bank,
    keys_per_split,  # multiple of BLOCK_K
    HAS_POS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,  # tensor-core operand dtype (see dot_precision)
    X_TERMS: tl.constexpr,  # 16-bit terms of the fp32 query
    LO_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    P_SCALE: tl.constexpr,  # power of two applied to P before rounding it to COMPUTE_DTYPE
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr,  # D-chunk of s = x·bᵀ: BLOCK_D keeps the split query tile in registers for the whole scan;
    # smaller streams it chunk by chunk (re-read from L1/L2), freeing registers for more rows next to the μ accumulator
):
    pid_r = tl.program_id(0)  # fastest axis: row blocks of one split run together and share bank tiles in L2
    split = tl.program_id(1)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < R
    d_ok = offs_d < D
    rows = offs_r.to(tl.int64)

    x_raw = tl.load(x_ptr + rows[:, None] * stride_x + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if BLOCK_DC == BLOCK_D:
        x_hi, x_lo, x_lo2 = split_query(x_raw, COMPUTE_DTYPE, X_TERMS, LO_SCALE)
    inv_tau = tl.load(inv_tau_ptr + offs_r, mask=row_ok, other=1.0)
    qk_scale = inv_tau * 1.4426950408889634  # t_r · log2(e)

    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    if HAS_POS:
        # The positive is logit 0 of every row; split 0 starts from it, the others from the empty state.
        pos = tl.load(
            pos_ptr + rows[:, None] * stride_pos + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        s_pos = tl.sum(x_raw.to(tl.float32) * pos, axis=1) * qk_scale
        first = split == 0
        m_i = tl.where(first, s_pos, m_i)
        l_i = tl.where(first, 1.0, l_i)
        acc = tl.where(first, pos * P_SCALE, acc)

    k_start = split * keys_per_split
    k_end = tl.minimum(k_start + keys_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        b = tl.load(
            bank_ptr + offs_k.to(tl.int64)[:, None] * stride_bank + offs_d[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(COMPUTE_DTYPE)
        if BLOCK_DC == BLOCK_D:
            s = query_dot(x_hi, x_lo, x_lo2, tl.trans(b), X_TERMS, LO_SCALE, INPUT_PRECISION)
        else:
            s = chunked_query_dot(
                x_ptr, rows, row_ok, stride_x, bank_ptr, offs_k, k_ok, stride_bank, D,
                BLOCK_R, BLOCK_K, BLOCK_DC, COMPUTE_DTYPE, X_TERMS, LO_SCALE, INPUT_PRECISION,
            )  # fmt: skip
        s = s * qk_scale[:, None]
        s = tl.where(k_ok[None, :], s, float("-inf"))
        # Every block holds at least one valid column, so m_new is finite and α, P never see inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = tl.dot((p * P_SCALE).to(COMPUTE_DTYPE), b, input_precision=INPUT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    part = split.to(tl.int64) * R + rows
    tl.store(m_part_ptr + part, m_i, mask=row_ok)
    tl.store(l_part_ptr + part, l_i, mask=row_ok)
    tl.store(
        acc_part_ptr + part[:, None] * D + offs_d[None, :],
        acc * (1.0 / P_SCALE),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _bank_softmax_stats_merge_kernel(
    m_part_ptr,  # (S, R) fp32
    l_part_ptr,  # (S, R) fp32
    acc_part_ptr,  # (S, R, D) fp32
    lse_ptr,  # (R,) fp32 out
    mu_ptr,  # (R, D) fp32 out
    R,
    D,
    NUM_SPLITS,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS
    part = offs_s.to(tl.int64) * R + row
    m = tl.load(m_part_ptr + part, mask=s_ok, other=float("-inf"))
    l = tl.load(l_part_ptr + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.math.exp2(m - m_max)  # empty splits: 2^(-inf) = 0
    w = tl.where(s_ok, w, 0.0)
    l_sum = tl.sum(w * l, axis=0)
    if pid_d == 0:
        tl.store(lse_ptr + row, (m_max + tl.math.log2(l_sum)) * 0.6931471805599453)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.load(acc_part_ptr + part[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    mu = tl.sum(w[:, None] * acc, axis=0) / l_sum
    tl.store(mu_ptr + row * D + offs_d, mu, mask=d_ok)


def merge_block_d(num_splits: int, d: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_D) of the merge kernel: at most 8192 fp32 partial means in flight per program."""
    block_s = max(2, triton.next_power_of_2(num_splits))
    block_d = max(16, min(triton.next_power_of_2(d), 8192 // block_s))
    return block_s, block_d


def _partial_constexprs(plan: DotPlan, has_pos: bool, d: int, block_r: int, block_k: int, block_dc: int = 0) -> dict:
    """Compile-time arguments of the partial kernel (shared by the launcher and :func:`aot_specs`); ``block_dc`` 0
    (or any value ≥ BLOCK_D) means the whole row."""
    block_d = block_d_for(d)
    return {
        "HAS_POS": has_pos,
        **plan.constexprs(),
        "P_SCALE": 32768.0 if plan.compute_dtype == torch.float16 else 1.0,
        "BLOCK_R": block_r,
        "BLOCK_K": block_k,
        "BLOCK_D": block_d,
        "BLOCK_DC": block_d_chunk(block_dc, block_d),
    }


_TRITON_TYPE = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def aot_specs(
    d: int, x_dtype: torch.dtype, bank_dtype: torch.dtype, arch: int = 80, config: StatsConfig | None = None
) -> list[dict]:
    """The kernel variants a launch with feature dim ``d``, ``x_dtype`` queries (and positives) and a
    ``bank_dtype`` bank compiles on compute capability ``arch`` (its config table, or ``config``), for ahead-of-time
    checks: the partial kernel with a positive (without one the streaming loop is the same code) and the merge kernel
    at its largest split count.

    Returns dicts with ``name``, ``fn``, ``signature``, ``constexprs``, ``attrs`` (16-byte divisibility of pointers
    and of the D-multiple ints, as the JIT specialises them), ``num_warps`` and ``num_stages``.
    """
    plan = dot_plan(x_dtype, bank_dtype)
    cfg = config or pick_config(d, plan, arch)
    specs = []
    for has_pos in (True,):
        signature = {
            "x_ptr": _TRITON_TYPE[x_dtype], "pos_ptr": _TRITON_TYPE[x_dtype], "bank_ptr": _TRITON_TYPE[bank_dtype],
            "inv_tau_ptr": "*fp32",
            "m_part_ptr": "*fp32", "l_part_ptr": "*fp32", "acc_part_ptr": "*fp32",
            "R": "i32", "K": "i32", "D": "i32", "stride_x": "i32", "stride_pos": "i32", "stride_bank": "i32",
            "keys_per_split": "i32",
        }  # fmt: skip
        constexprs = _partial_constexprs(plan, has_pos, d, cfg.block_r, cfg.block_k, cfg.block_dc)
        signature.update({name: "constexpr" for name in constexprs})
        specs.append(
            {
                "name": f"partial[D={d},x={str(x_dtype)[6:]},bank={str(bank_dtype)[6:]}{config_tag(config)}]",
                "fn": _bank_softmax_stats_partial_kernel,
                "signature": signature,
                "constexprs": constexprs,
                "attrs": {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13)},
                "num_warps": cfg.num_warps,
                "num_stages": cfg.num_stages,
            }
        )
    for num_splits in (MAX_SPLITS,):
        block_s, merge_d = merge_block_d(num_splits, d)
        signature = {
            "m_part_ptr": "*fp32", "l_part_ptr": "*fp32", "acc_part_ptr": "*fp32", "lse_ptr": "*fp32",
            "mu_ptr": "*fp32", "R": "i32", "D": "i32", "NUM_SPLITS": "i32", "BLOCK_S": "constexpr",
            "BLOCK_D": "constexpr",
        }  # fmt: skip
        specs.append(
            {
                "name": f"merge[D={d},splits={num_splits}]",
                "fn": _bank_softmax_stats_merge_kernel,
                "signature": signature,
                "constexprs": {"BLOCK_S": block_s, "BLOCK_D": merge_d},
                "attrs": {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 6)},
                "num_warps": 4,
                "num_stages": 1,
            }
        )
    return specs


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits exercise the merge without slowing the emulation down


def bank_softmax_stats(
    x: torch.Tensor,
    inv_tau: torch.Tensor,
    bank: torch.Tensor,
    pos: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_r: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_dc: int | None = None,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp and softmax-weighted bank mean, fused and split across the bank.

    Args:
        x: (R, D) fp16/bf16/fp32 query rows (normalised by the caller).
        inv_tau: (R,) fp32 inverse temperature 1/τ of each row.
        bank: (K, D) fp16/bf16/fp32 bank rows (only valid rows), last dim contiguous.
        pos: optional (R, D) positive per row, prepended as logit 0 and value 0.
        num_splits: bank splits (default: about two programs per SM, see :func:`num_splits_for`).
        block_r, block_k, num_warps, num_stages, block_dc: override the config table (tests use small blocks;
            ``block_dc`` is the D-chunk of the logits dot, 0 for the whole row).
        allow_tf32: single TF32 products for fp32 inputs (default 3xTF32, fp32-accurate).

    Returns:
        lse: (R,) fp32 natural-log log-sum-exp of ``inv_tau[r] * [x_r·pos_r, x_r·b_0, ..., x_r·b_{K-1}]``.
        mu: (R, D) fp32 softmax-weighted mean of ``[pos_r, b_0, ..., b_{K-1}]``.
    """
    if x.dim() != 2 or bank.dim() != 2:
        raise ValueError(f"x and bank must be 2-D, got {tuple(x.shape)} and {tuple(bank.shape)}")
    r, d = x.shape
    k = bank.shape[0]
    if bank.shape[1] != d:
        raise ValueError(f"feature dims differ: x {tuple(x.shape)}, bank {tuple(bank.shape)}")
    for name, t in (("x", x), ("bank", bank)) + ((("pos", pos),) if pos is not None else ()):
        if t.dtype not in _TRITON_TYPE:
            raise TypeError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if pos is not None and pos.shape != x.shape:
        raise ValueError(f"pos must have the shape of x {tuple(x.shape)}, got {tuple(pos.shape)}")
    if inv_tau.shape != (r,):
        raise ValueError(f"inv_tau must have shape ({r},), got {tuple(inv_tau.shape)}")
    if k == 0 and pos is None:
        raise ValueError("empty bank and no positive: the softmax has no entries")

    device = x.device
    lse = torch.empty(r, dtype=torch.float32, device=device)
    mu = torch.empty(r, d, dtype=torch.float32, device=device)
    if r == 0:
        return lse, mu

    x = x if x.stride(-1) == 1 else x.contiguous()
    bank = bank if bank.stride(-1) == 1 else bank.contiguous()
    if pos is not None and pos.stride(-1) != 1:
        pos = pos.contiguous()
    inv_tau = inv_tau.to(device=device, dtype=torch.float32).contiguous()

    plan = dot_plan(x.dtype, bank.dtype, allow_tf32)
    cfg = pick_config(d, plan, device_arch(x.device))
    block_r = block_r or cfg.block_r
    block_k = block_k or cfg.block_k
    num_warps = num_warps or cfg.num_warps
    num_stages = num_stages or cfg.num_stages
    block_dc = cfg.block_dc if block_dc is None else block_dc
    if num_splits is None:
        num_splits = num_splits_for(r, k, block_r, block_k, _num_sms(device))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    keys_per_split = triton.cdiv(triton.cdiv(max(k, 1), num_splits), block_k) * block_k

    m_part = torch.empty(num_splits, r, dtype=torch.float32, device=device)
    l_part = torch.empty(num_splits, r, dtype=torch.float32, device=device)
    acc_part = torch.empty(num_splits, r, d, dtype=torch.float32, device=device)
    grid = (triton.cdiv(r, block_r), num_splits)
    _bank_softmax_stats_partial_kernel[grid](
        x,
        pos if pos is not None else x,
        bank,
        inv_tau,
        m_part,
        l_part,
        acc_part,
        r,
        k,
        d,
        x.stride(0),
        pos.stride(0) if pos is not None else 0,
        bank.stride(0),
        keys_per_split,
        **_partial_constexprs(plan, pos is not None, d, block_r, block_k, block_dc),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    block_s, merge_d = merge_block_d(num_splits, d)
    _bank_softmax_stats_merge_kernel[(r, triton.cdiv(d, merge_d))](
        m_part, l_part, acc_part, lse, mu, r, d, num_splits, BLOCK_S=block_s, BLOCK_D=merge_d, num_warps=4
    )
    return lse, mu
