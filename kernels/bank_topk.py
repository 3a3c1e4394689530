r"""Exact top-k of query·bank similarities with indices: fused dot + streaming selection, split across the bank.

Derivation
----------
For query row n the op returns the k largest s_{n,j} = q_n·b_j (fp32, tensor-core dot with fp32 accumulation) and
their indices j, descending, ties broken towards the lower index. A sorting network moves values only, so every
(value, index) pair is packed into one int64 key whose integer order is the wanted order:

    bits   = float32 bits of s reinterpreted as int32
    key32  = bits                     if bits >= 0   (non-negative floats already order like their bits)
           = bits XOR 0x7FFFFFFF      otherwise      (negative floats: flip magnitude bits so larger -> larger)
    key    = key32 << 32  |  (2^32 - 1 - j)

key32 is a monotone map of the float onto signed int32, and the low word is the inverted index, so among equal
values the lower index has the larger key. All keys are distinct, which makes the selection a function of the set
of candidates only: the result does not depend on block sizes, split counts or merge order (bitwise reproducible).
Indices must be < 2^32; the launcher allows banks up to 2^31 - 2^24 rows (split bounds are int32) and addresses
them with int64 offsets.

Streaming: program (row block, split) keeps the k best keys of each row seen so far as an UNSORTED list `best`
(padded to KP = next power of two with +inf sentinels that are never the minimum), and their minimum, the running
k-th best key κ_n, with its value v_n. For every bank block it computes the fp32 tile s and its row maxima; a row can
gain only if its maximum exceeds v_n (equal values arrive later in the scan, i.e. with a higher index, so they lose the
tie). After the first blocks this is rare: of K keys, a row inserts about k·ln(K/k) in all. While some row of the
block can gain, one extraction step runs for every row at once: the row maximum and its lowest column give a key,
which replaces κ_n in `best` (keys are distinct, so exactly one slot) where it beats κ_n; κ_n and v_n are re-read and
the extracted column is masked. The steady state costs a row max and a compare per score; no sorting network runs
inside the loop. At the end each program sorts its list once (bitonic sort) and writes it descending. A second kernel
merges the per-split lists — max(running ascending, next descending) is bitonic and holds the top KP of both, sorted
by one bitonic merge — and decodes the first k keys back to (value, index).

Two-pass search (``algorithm="two_pass"``). In the one-pass scan a row inserts about k·ln(M/k) keys over a split of
M scores, and with 64 rows per block most tiles trigger an extraction step; the data-dependent loop also keeps
Triton from software-pipelining the bank loads (the sm_80 and sm_90 builds of the whole-row scan have no async
copies; the tile-max kernel below has them). The two-pass search moves nearly all selection out of the scan:

1. ``_bank_topk_tile_max_kernel`` scans the bank like the one-pass kernel but keeps, per row, the top k of its TILE
   maxima: key (max_t, tile t), one branch-free insertion per tile, no inner loop, so the loads stay pipelined.
   The merge kernel combines the splits: per row the k tiles T_1..T_k of largest maximum (ties: lower tile), and
   f_n = max(T_k), the k-th largest tile maximum.
2. The one-pass kernel (``TILE_LIST``) then scans only its row block's union of those tiles (at most BLOCK_N·k
   distinct tiles, deduplicated and ascending, shared out among the programs), dropping scores below f_n (a
   floor set just under it: ``_candidate_tiles``).

Why this is exact. f_n is at most the k-th best score v_k: the maxima of T_1..T_k are k distinct scores ≥ f_n. A
score > f_n lies in a tile whose maximum is > f_n, and every such tile is among T_1..T_k. Scores equal to f_n are
needed only as far as the lowest indices allow: with c tiles of maximum > f_n (c < k, each holding at least one of
the c' ≥ c scores > f_n), k - c' ≤ k - c equal scores are wanted; T_{c+1}..T_k are the k - c lowest tiles of maximum
f_n, each holding at least one score equal to f_n, so they hold at least k - c such scores, each lower-indexed than
any outside the candidate tiles. Hence the top k of the candidate tiles is the top k of the row. Both kernels score a
tile with the same function and blocks (``_score_tile``), so the scores, and the result, are bitwise those of a
one-pass scan with the same config. Work: one full scan with a row max and a small insertion per tile, plus BLOCK_N·k
of K/BLOCK_K tiles rescored (about 8% for k = 10, 64 rows, K = 2^20, BLOCK_K = 128), in which a row inserts about its
k final keys.

Values are canonicalised (s + 0.0 turns -0.0 into +0.0) before packing, so equal floats are equal keys and ties
follow the index, like a stable sort of the floats. NaN and -inf scores are never selected (no comparison with NaN is
true, and nothing is below the -inf start value); a row left with fewer than k selected (non-finite inputs) gets NaN
values and in-range placeholder indices for the rest, instead of undefined ones.

D-chunked dot (config ``block_dc``): by default the (split) query tile stays in registers for the whole scan; with
``block_dc`` < BLOCK_D the tile s is accumulated over D-chunks of query and bank
(:func:`dot_precision.chunked_query_dot`, the query re-read from L1/L2 per bank tile), which frees the registers and
shared memory of the whole-row tiles: at D = 512 it lets sm_90 try 64-row blocks (CANDIDATES_SM90) and keeps the
sm_8x table within its shared memory.

The networks are written here with min/max over size-2 axes of a [2, 2, ...] view of the tile rather than with
``tl.topk``/``tl.sort``, whose compare-exchange is an xor-reduction that Triton's CPU interpreter evaluates element by
element in Python (too slow for the test suite); on the GPU both are in-register or warp-shuffle reductions.
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
    "bank_topk",
    "TopkConfig",
    "CONFIGS",
    "CONFIGS_SM90",
    "CANDIDATES_SM90",
    "TWO_PASS_SM90",
    "pick_config",
    "MAX_K",
    "ALGORITHMS",
    "aot_specs",
]

MAX_K = 256
ALGORITHMS = ("one_pass", "two_pass")
MAX_SPLITS = 256
MIN_BLOCKS_PER_SPLIT = 8
MIN_KEY = tl.constexpr(-9223372036854775808)  # int64 range of the packed keys (sentinels)
MAX_KEY = tl.constexpr(9223372036854775807)


@dataclass(frozen=True)
class TopkConfig:
    """Launch configuration of the partial kernel."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    block_dc: int = 0  # D-chunk of the dot; 0: the whole row (query tile held in registers for the whole scan)


# Deterministic config table keyed by (BLOCK_D, DotPlan.config_class), as in bank_softmax_stats. The D = 128 and 512
# entries are compiled for sm_80/sm_90 and spill-checked by tests/test_kernels_aot.py (k padded to 16 and 64); D = 32,
# 64, 256 were checked once the same way (D = 16 was not). The running list costs BLOCK_N·KP int64 registers, so wide
# rows (D = 512) use 32-row blocks, and the launcher shrinks BLOCK_N for KP > 64. fp32 banks are limited to D <= 128:
# the fp32 operand tiles of wider rows spill at every tile size. On an H100 (benchmarks/gpu_check.py's sweep, N = 256,
# K = 2^20, fp32 queries over an fp16 bank: benchmarks/results/nvidia-h100-80gb-hbm3/kernel_configs.md) D = 128
# (64, 64, 4, 3) ran k = 10 in 0.77 ms and CONFIGS_SM90's (64, 128, 4, 3), which spills on sm_80, in 0.74 ms; D = 512
# (32, 64, 4, 2) was the fastest tried. The other entries are not measured. On sm_80 that whole-row D = 512 tile needs
# 192 KB of shared memory over a bf16 bank (over the A100's 163 KB: the launch would fail; 160 KB over an fp16 bank),
# so the sm_8x table streams the dot in D-chunks of 64 (16 KB) for both bank dtypes (the key does not tell them apart;
# neither is measured), and the H100 keeps its measured whole-row entry.
CONFIGS: dict[tuple[int, str], TopkConfig] = {
    **{(bd, "16"): TopkConfig(64, 64, 4, 3) for bd in (16, 32, 64)},
    (128, "16"): TopkConfig(64, 64, 4, 3),
    (256, "16"): TopkConfig(32, 64, 8, 2),
    (512, "16"): TopkConfig(32, 64, 8, 2),
    **{(bd, "32x16"): TopkConfig(64, 64, 4, 3) for bd in (16, 32, 64)},
    (128, "32x16"): TopkConfig(64, 64, 4, 3),
    (256, "32x16"): TopkConfig(32, 64, 8, 2),
    (512, "32x16"): TopkConfig(32, 64, 4, 2, 64),
    **{(bd, "32"): TopkConfig(32, 64, 4, 2) for bd in (16, 32)},
    **{(bd, "32"): TopkConfig(32, 64, 8, 2) for bd in (64, 128)},
}
CONFIGS_SM90: dict[tuple[int, str], TopkConfig] = {
    (128, "16"): TopkConfig(64, 128, 4, 3),
    (128, "32x16"): TopkConfig(64, 128, 4, 3),
    (512, "32x16"): TopkConfig(32, 64, 4, 2),
}
# Not yet measured, so not in the tables: with the dot streamed in D-chunks of 64 (a GEMM main loop; the query is
# re-read from L1/L2) the split fp32 query tile no longer sits in registers, so D = 512 runs 64-row blocks like D = 128
# instead of 32 (fewer L2 passes over the bank, wgmma-sized tiles). tests/test_kernels_aot.py compiles each for sm_90
# (k padded to 16 and 64) and checks for spills; benchmarks/gpu_check.py's sweep times them next to the table entries.
CANDIDATES_SM90: dict[tuple[int, str], list[TopkConfig]] = {
    (512, "32x16"): [
        TopkConfig(64, 64, 4, 3, 64),
        TopkConfig(64, 64, 8, 3, 64),
        TopkConfig(64, 32, 4, 3, 64),
        TopkConfig(64, 64, 4, 4, 64),
    ],
}

_TRITON_TYPE = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


# The two-pass search launches both passes with one config (same blocks: bitwise-equal tile scores). On sm_90 the
# measured whole-row D = 512 entry leaves the second pass's build with three bf16 query terms 16 bytes of stack (a
# spill), so the two-pass search streams that dot in D-chunks of 64, as the sm_8x table does (the key covers fp16
# banks too, whose whole-row build did not spill). Not measured.
TWO_PASS_SM90: dict[tuple[int, str], TopkConfig] = {(512, "32x16"): TopkConfig(32, 64, 4, 2, 64)}


def pick_config(d: int, plan: DotPlan, arch: int = 80, algorithm: str = "one_pass") -> TopkConfig:
    """Launch configuration for feature dim ``d``, the dot plan, compute capability ``arch`` (e.g. 90) and the
    search ``algorithm``."""
    cfg = table_config("bank_topk", d, plan, arch, CONFIGS, CONFIGS_SM90)
    if algorithm == "two_pass" and arch == 90:
        cfg = TWO_PASS_SM90.get((max(16, triton.next_power_of_2(d)), plan.config_class), cfg)
    return cfg


@triton.jit
def _pack_keys(s, idx):
    """int64 keys ordered like (s descending, idx ascending); see the module docstring."""
    bits = s.to(tl.int32, bitcast=True)
    key32 = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (key32.to(tl.int64) << 32) | (4294967295 - idx.to(tl.int64))


# Bitonic networks on a tile viewed as a hypercube [2] * N_DIMS (rows are the outer axes, the sorted dimension the
# inner ones). A compare-exchange along one axis is a min and a max over that size-2 axis: cheap on the GPU (in-thread
# or one shuffle) and vectorised in the interpreter, unlike a custom-combine reduction.


@triton.jit
def _upper_bit(N_DIMS: tl.constexpr, AXIS: tl.constexpr):
    """Bit AXIS (counted from the innermost axis) of each position: 1 for the upper element of each pair."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - AXIS - 1) + [2] + [1] * AXIS)


@triton.jit
def _compare_exchange(h, flip, AXIS: tl.constexpr, N_DIMS: tl.constexpr):
    """Put the min of each pair along AXIS at the lower position and the max at the upper (swapped where flip)."""
    lo = tl.min(h, axis=N_DIMS - 1 - AXIS, keep_dims=True)
    hi = tl.max(h, axis=N_DIMS - 1 - AXIS, keep_dims=True)
    return tl.where((_upper_bit(N_DIMS, AXIS) ^ flip) == 1, hi, lo)


@triton.jit
def _bitonic_merge(h, STAGE: tl.constexpr, ORDER: tl.constexpr, N_DIMS: tl.constexpr):
    """Sort every bitonic run of 2^STAGE elements: ORDER 0 ascending, 1 descending, 2 alternating run by run."""
    if ORDER == 2:
        flip = _upper_bit(N_DIMS, STAGE)
    else:
        flip = ORDER
    for i in tl.static_range(STAGE):
        h = _compare_exchange(h, flip, STAGE - 1 - i, N_DIMS)
    return h


@triton.jit
def _sort_bitonic_rows(x, LOG_ROWS: tl.constexpr, LOG_N: tl.constexpr, DESCENDING: tl.constexpr):
    """Sort each row of x (2^LOG_ROWS, 2^LOG_N) that is already bitonic (e.g. sorted either way, or max(asc, desc))."""
    h = tl.reshape(x, [2] * (LOG_ROWS + LOG_N))
    h = _bitonic_merge(h, LOG_N, DESCENDING, LOG_ROWS + LOG_N)
    return tl.reshape(h, x.shape)


@triton.jit
def _topk_rows(x, LOG_ROWS: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr, DESCENDING: tl.constexpr):
    """The 2^LOG_K largest of each row of x (2^LOG_ROWS, 2^LOG_N), sorted.

    Bitonic sort up to runs of 2^LOG_K alternating ascending/descending; then repeatedly the elementwise max of
    neighbouring runs (a bitonic run holding the top 2^LOG_K of both) re-sorted by one bitonic merge.
    """
    h = tl.reshape(x, [2] * (LOG_ROWS + LOG_N))
    for i in tl.static_range(1, LOG_K + 1):
        h = _bitonic_merge(h, i, 2 if i < LOG_N else DESCENDING, LOG_ROWS + LOG_N)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.max(h, axis=LOG_ROWS + LOG_N - (i - LOG_K - 1) - 1 - LOG_K)
        h = _bitonic_merge(h, LOG_K, 2 if i < LOG_N else DESCENDING, LOG_ROWS + LOG_N - (i - LOG_K))
    return tl.reshape(h, [x.shape[0], 1 << LOG_K])


@triton.jit
def _unpack_value(key):
    """fp32 value of keys made by :func:`_pack_keys`."""
    key32 = (key >> 32).to(tl.int32)
    return tl.where(key32 >= 0, key32, key32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _score_tile(
    q_hi, q_lo, q_lo2,  # split query tile (whole-row dot only)
    q_ptr, rows, n_ok, stride_q,
    bank_ptr, offs_k, stride_bank, offs_d, d_ok,
    K, D,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, X_TERMS: tl.constexpr, LO_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """fp32 (BLOCK_N, BLOCK_K) tile s = q·bᵀ for bank rows ``offs_k``, -inf past the bank's end.

    Every kernel of this module scores tiles through this one function with the same blocks, so a tile's scores are
    bitwise the same in each (the two-pass search relies on it)."""
    k_ok = offs_k < K
    if BLOCK_DC == BLOCK_D:
        b = tl.load(
            bank_ptr + offs_k.to(tl.int64)[:, None] * stride_bank + offs_d[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(COMPUTE_DTYPE)
        s = query_dot(q_hi, q_lo, q_lo2, tl.trans(b), X_TERMS, LO_SCALE, INPUT_PRECISION)
    else:
        s = chunked_query_dot(
            q_ptr, rows, n_ok, stride_q, bank_ptr, offs_k, k_ok, stride_bank, D,
            BLOCK_N, BLOCK_K, BLOCK_DC, COMPUTE_DTYPE, X_TERMS, LO_SCALE, INPUT_PRECISION,
        )  # fmt: skip
    return tl.where(k_ok[None, :], s, float("-inf"))


@triton.jit
def _insert_row_keys(best, kth, kth_value, key, value):
    """Replace κ_n (the minimum of row n of ``best``) by ``key`` where ``value`` > v_n; return (best, κ, v) updated.

    Callers present keys in ascending index order, so an equal value (a higher index) rightly loses the tie."""
    take = value > kth_value
    best = tl.where((best == kth[:, None]) & take[:, None], key[:, None], best)
    kth = tl.min(best, axis=1)
    kth_value = tl.where(kth < MIN_KEY + 2147483648, float("-inf"), _unpack_value(kth))
    return best, kth, kth_value


@triton.jit
def _query_terms(
    q_ptr, rows, n_ok, stride_q, offs_d, d_ok,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, X_TERMS: tl.constexpr, LO_SCALE: tl.constexpr,
):  # fmt: skip
    """The split query tile held for the whole scan (whole-row dot); placeholders when the dot streams D-chunks."""
    q_hi = tl.zeros((BLOCK_N, BLOCK_D), COMPUTE_DTYPE)
    q_lo = q_hi
    q_lo2 = q_hi
    if BLOCK_DC == BLOCK_D:
        q = tl.load(q_ptr + rows[:, None] * stride_q + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        q_hi, q_lo, q_lo2 = split_query(q, COMPUTE_DTYPE, X_TERMS, LO_SCALE)
    return q_hi, q_lo, q_lo2


@triton.jit
def _empty_lists(k, offs_j, BLOCK_N: tl.constexpr, KP: tl.constexpr):
    """(best, κ, v) of empty running lists: slots j < k hold distinct keys below every real key (MIN_KEY + j; a real
    key's low word is 2^32 - 1 - index >= 2^31), padding slots MAX_KEY, never the minimum; κ = min(best), v = -inf."""
    best = tl.where(offs_j[None, :] < k, MIN_KEY + offs_j[None, :].to(tl.int64), MAX_KEY) + tl.zeros(
        (BLOCK_N, KP), tl.int64
    )
    return best, tl.full((BLOCK_N,), MIN_KEY, tl.int64), tl.full((BLOCK_N,), float("-inf"), tl.float32)


@triton.jit
def _store_sorted_lists(keys_ptr, best, split, N, rows, n_ok, offs_j, LOG_BLOCK_N: tl.constexpr, LOG_KP: tl.constexpr):
    """Padding slots become MIN_KEY (last in the merge); each row's list sorted descending into keys[split]."""
    best = tl.where(best == MAX_KEY, MIN_KEY, best)
    best = _topk_rows(best, LOG_BLOCK_N, LOG_KP, LOG_KP, 1)
    out = (split.to(tl.int64) * N + rows)[:, None] * (1 << LOG_KP) + offs_j[None, :]
    tl.store(keys_ptr + out, best, mask=n_ok[:, None])


@triton.jit
def _above_floor(row_max, floor, TILE_LIST: tl.constexpr):
    """The row maxima a row may insert: -inf below the row's floor (second pass only; NaN never passes)."""
    if TILE_LIST:
        row_max = tl.where(row_max >= floor, row_max, float("-inf"))
    return row_max


@triton.jit
def _bank_topk_partial_kernel(
    q_ptr,  # (N, D) queries
    bank_ptr,  # (K, D) bank
    keys_ptr,  # (S, N, KP) int64 out: top-KP keys of each program's bank range, descending
    tiles_ptr,  # TILE_LIST: (row blocks, tiles_stride) int32 bank tile ids per row block, ascending, then padding
    tile_counts_ptr,  # TILE_LIST: (row blocks,) int32 valid entries of each tiles_ptr row
    floor_ptr,  # TILE_LIST: (N,) fp32 lower bound of each row's k-th best score
    N,
    K,
    D,
    stride_q,
    stride_bank,
    keys_per_split,  # multiple of BLOCK_K
    tiles_stride,
    k,  # neighbours kept per row (<= KP)
    LOG_KP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,  # tensor-core operand dtype (see dot_precision)
    X_TERMS: tl.constexpr,  # 16-bit terms of the fp32 query
    LO_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    LOG_BLOCK_N: tl.constexpr,
    LOG_BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr,  # D-chunk of the dot: BLOCK_D keeps the split query tile in registers for the whole scan;
    # smaller streams it chunk by chunk with the bank tile (GEMM main loop; the L1/L2-resident query is re-read)
    TILE_LIST: tl.constexpr,  # False: program (row block, split) scans the split's bank tiles; True: its share of the
    # row block's candidate tiles (second pass of the two-pass search), scores below the row's floor dropped
):
    BLOCK_N: tl.constexpr = 1 << LOG_BLOCK_N
    BLOCK_K: tl.constexpr = 1 << LOG_BLOCK_K
    KP: tl.constexpr = 1 << LOG_KP
    pid_n = tl.program_id(0)  # fastest axis: row blocks of one split share bank tiles in L2
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, KP)
    n_ok = offs_n < N
    d_ok = offs_d < D
    rows = offs_n.to(tl.int64)
    q_hi, q_lo, q_lo2 = _query_terms(
        q_ptr, rows, n_ok, stride_q, offs_d, d_ok, BLOCK_N, BLOCK_D, BLOCK_DC, COMPUTE_DTYPE, X_TERMS, LO_SCALE
    )

    # -- phase 1: empty running lists (see _empty_lists)
    best, kth, kth_value = _empty_lists(k, offs_j, BLOCK_N, KP)

    # -- phase 2: stream the program's bank tiles in ascending index order
    if TILE_LIST:
        count = tl.load(tile_counts_ptr + pid_n)
        per_program = tl.cdiv(count, tl.num_programs(1))
        t_start = split * per_program
        t_end = tl.minimum(t_start + per_program, count)
        floor = tl.load(floor_ptr + offs_n, mask=n_ok, other=float("inf"))
    else:
        floor = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # unused
        t_start = split * (keys_per_split // BLOCK_K)
        t_end = tl.minimum(t_start + keys_per_split // BLOCK_K, tl.cdiv(K, BLOCK_K))
    for t in range(t_start, t_end):
        if TILE_LIST:
            k0 = tl.load(tiles_ptr + pid_n.to(tl.int64) * tiles_stride + t) * BLOCK_K
        else:
            k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        s = _score_tile(
            q_hi, q_lo, q_lo2, q_ptr, rows, n_ok, stride_q, bank_ptr, offs_k, stride_bank, offs_d, d_ok, K, D,
            BLOCK_N, BLOCK_K, BLOCK_D, BLOCK_DC, COMPUTE_DTYPE, X_TERMS, LO_SCALE, INPUT_PRECISION,
        )  # fmt: skip
        row_max = tl.max(s, axis=1)
        row_value = _above_floor(row_max, floor, TILE_LIST)
        gain = tl.max((row_value > kth_value).to(tl.int32), axis=0)
        while gain > 0:
            # one extraction step for every row: its best remaining column (lowest index among equal maxima)
            col = tl.min(tl.where(s == row_max[:, None], offs_k[None, :], 2147483647), axis=1)
            best, kth, kth_value = _insert_row_keys(best, kth, kth_value, _pack_keys(row_max + 0.0, col), row_value)
            s = tl.where(offs_k[None, :] == col[:, None], float("-inf"), s)
            row_max = tl.max(s, axis=1)
            row_value = _above_floor(row_max, floor, TILE_LIST)
            gain = tl.max((row_value > kth_value).to(tl.int32), axis=0)

    # -- phase 3: one sort, descending, and the store
    _store_sorted_lists(keys_ptr, best, split, N, rows, n_ok, offs_j, LOG_BLOCK_N, LOG_KP)


@triton.jit
def _bank_topk_tile_max_kernel(
    q_ptr,  # (N, D) queries
    bank_ptr,  # (K, D) bank
    keys_ptr,  # (S, N, KP) int64 out: the top-KP (tile maximum, tile id) keys of each split, descending
    N,
    K,
    D,
    stride_q,
    stride_bank,
    keys_per_split,  # multiple of BLOCK_K
    k,  # tiles kept per row (<= KP)
    LOG_KP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    X_TERMS: tl.constexpr,
    LO_SCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    LOG_BLOCK_N: tl.constexpr,
    LOG_BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):
    """First pass of the two-pass search: per row, the k bank tiles with the largest maxima (ties: lower tile).

    One key per row and tile, inserted without a data-dependent loop, so the bank loads stay software-pipelined."""
    BLOCK_N: tl.constexpr = 1 << LOG_BLOCK_N
    BLOCK_K: tl.constexpr = 1 << LOG_BLOCK_K
    KP: tl.constexpr = 1 << LOG_KP
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, KP)
    n_ok = offs_n < N
    d_ok = offs_d < D
    rows = offs_n.to(tl.int64)
    q_hi, q_lo, q_lo2 = _query_terms(
        q_ptr, rows, n_ok, stride_q, offs_d, d_ok, BLOCK_N, BLOCK_D, BLOCK_DC, COMPUTE_DTYPE, X_TERMS, LO_SCALE
    )
    best, kth, kth_value = _empty_lists(k, offs_j, BLOCK_N, KP)

    t_start = split * (keys_per_split // BLOCK_K)
    t_end = tl.minimum(t_start + keys_per_split // BLOCK_K, tl.cdiv(K, BLOCK_K))
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        s = _score_tile(
            q_hi, q_lo, q_lo2, q_ptr, rows, n_ok, stride_q, bank_ptr, offs_k, stride_bank, offs_d, d_ok, K, D,
            BLOCK_N, BLOCK_K, BLOCK_D, BLOCK_DC, COMPUTE_DTYPE, X_TERMS, LO_SCALE, INPUT_PRECISION,
        )  # fmt: skip
        row_max = tl.max(s, axis=1) + 0.0  # NaN scores are ignored (maxnum); -0.0 -> +0.0
        tile = tl.zeros((BLOCK_N,), tl.int32) + t
        best, kth, kth_value = _insert_row_keys(best, kth, kth_value, _pack_keys(row_max, tile), row_max)

    _store_sorted_lists(keys_ptr, best, split, N, rows, n_ok, offs_j, LOG_BLOCK_N, LOG_KP)


@triton.jit
def _bank_topk_merge_kernel(
    keys_ptr,  # (S, N, KP) int64 partial keys, each row descending
    values_ptr,  # (N, k) fp32 out
    indices_ptr,  # (N, k) int64 out
    N,
    NUM_SPLITS,
    k,
    LOG_KP: tl.constexpr,
    LOG_BLOCK_N: tl.constexpr,
):
    BLOCK_N: tl.constexpr = 1 << LOG_BLOCK_N
    KP: tl.constexpr = 1 << LOG_KP
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, KP)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    best = tl.load(keys_ptr + rows[:, None] * KP + offs_j[None, :], mask=n_ok[:, None], other=MIN_KEY)
    best = _sort_bitonic_rows(best, LOG_BLOCK_N, LOG_KP, 0)  # ascending
    for split in range(1, NUM_SPLITS):
        cand = tl.load(
            keys_ptr + (split * N + rows)[:, None] * KP + offs_j[None, :],
            mask=n_ok[:, None],
            other=MIN_KEY,
        )
        best = _sort_bitonic_rows(tl.maximum(best, cand), LOG_BLOCK_N, LOG_KP, 0)
    best = _sort_bitonic_rows(best, LOG_BLOCK_N, LOG_KP, 1)

    key32 = (best >> 32).to(tl.int32)
    bits = tl.where(key32 >= 0, key32, key32 ^ 0x7FFFFFFF)
    values = bits.to(tl.float32, bitcast=True)
    indices = 4294967295 - (best & 4294967295)
    # A slot still holding its start sentinel: the row had fewer than k selectable scores (NaN or -inf ones, from
    # non-finite inputs). Like a stable sort of an all-NaN row: value NaN, index = the slot (always in range).
    unfilled = best < MIN_KEY + 2147483648
    values = tl.where(unfilled, float("nan"), values)
    indices = tl.where(unfilled, offs_j[None, :].to(tl.int64), indices)
    out = rows[:, None] * k + offs_j[None, :]
    mask = n_ok[:, None] & (offs_j[None, :] < k)
    tl.store(values_ptr + out, values, mask=mask)
    tl.store(indices_ptr + out, indices, mask=mask)


def _merge(keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """Merge the (S, N, KP) per-program key lists into the (N, k) outputs."""
    num_splits, n, kp = keys.shape
    merge_n = max(2, min(_merge_block_n(kp), triton.next_power_of_2(n)))
    _bank_topk_merge_kernel[(triton.cdiv(n, merge_n),)](
        keys, values, indices, n, num_splits, k, LOG_KP=_log2(kp), LOG_BLOCK_N=_log2(merge_n), num_warps=4
    )


def _candidate_tiles(
    tile_values: torch.Tensor, tile_ids: torch.Tensor, block_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second-pass work list from the first pass's (N, k) top tiles (maxima descending; NaN where a row has fewer
    than k tiles with a selectable score).

    Returns:
        tiles: (row blocks, block_n·k) int32: the distinct tile ids of each block's rows, ascending, then padding.
        tile_counts: (row blocks,) int32 distinct ids per row block.
        floor: (N,) fp32 just below the k-th largest tile maximum m_k of each row (-inf where unfilled): m_k bounds
            the k-th best score from below (the k tiles of largest maximum hold k distinct scores ≥ m_k); the floor
            is m_k - (|m_k|·2^-20 + 2^-40). It only prunes, so lowering it keeps the search exact and costs at most
            a few insertions; it makes a second-pass score rounded differently from the first pass's (which the
            shared ``_score_tile`` should rule out) at worst misranked by that rounding instead of dropped.
    """
    n, k = tile_ids.shape
    num_blocks = triton.cdiv(n, block_n)
    filled = tile_values == tile_values  # not NaN
    kth_max = torch.nan_to_num(tile_values[:, -1], nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    floor = torch.where(kth_max < float("inf"), kth_max - (kth_max.abs() * 2**-20 + 2**-40), kth_max)
    pad = torch.iinfo(torch.int32).max
    ids = torch.where(filled, tile_ids.to(torch.int32), pad)
    ids = torch.nn.functional.pad(ids, (0, 0, 0, num_blocks * block_n - n), value=pad)
    ids = ids.view(num_blocks, block_n * k).sort(dim=1).values
    ids[:, 1:].masked_fill_(ids[:, 1:] == ids[:, :-1], pad)  # repeats (the mask is taken before the fill)
    ids = ids.sort(dim=1).values
    return ids, (ids != pad).sum(dim=1, dtype=torch.int32), floor


def _rows_per_program(cfg: TopkConfig, kp: int) -> int:
    """BLOCK_N of the scan kernels: the table's, lowered so the running lists hold at most 4096 keys (k > 64) and, up
    to k = 128, at most 16 keys per thread (the 16-row minimum allows 32 at k > 128 with 4 warps). With 4 warps that
    means 32 rows instead of 64 at k = 33..64, where 64-row lists (32 int64 keys per thread) next to a 64-row score
    tile left no registers for D-chunked accumulators (the sm_90 builds of CANDIDATES_SM90 (64, 64, 4, 3, 64) and
    (64, 64, 4, 4, 64) at k = 64 spilled 8-16 bytes; the H100 sweep had timed both row counts at D = 128, k = 64:
    32 rows 1.901 ms, 64 rows 1.951 ms), and 16 rows instead of 32 at k = 65..128 (not timed)."""
    return min(cfg.block_n, max(16, min(4096, 512 * cfg.num_warps) // kp))


def _merge_block_n(kp: int) -> int:
    """Rows per merge program: at most 4096 keys in flight."""
    return max(2, min(64, 4096 // kp))


def _partial_constexprs(plan: DotPlan, d: int, kp: int, block_n: int, block_k: int, block_dc: int = 0) -> dict:
    """Compile-time arguments of the partial kernel (shared by the launcher and :func:`aot_specs`); ``block_dc`` 0
    (or any value ≥ BLOCK_D) means the whole row."""
    block_d = max(16, triton.next_power_of_2(d))
    return {
        "LOG_KP": _log2(kp),
        **plan.constexprs(),
        "LOG_BLOCK_N": _log2(block_n),
        "LOG_BLOCK_K": _log2(block_k),
        "BLOCK_D": block_d,
        "BLOCK_DC": block_d_chunk(block_dc, block_d),
    }


# Padded KP the ahead-of-time check compiles: the common k = 10 for every dtype pair, and the largest tested k = 64
# for the production pair (fp32 queries over an fp16 bank).
AOT_KP = (16, 64)


def aot_specs(
    d: int, x_dtype: torch.dtype, bank_dtype: torch.dtype, arch: int = 80, config: TopkConfig | None = None
) -> list[dict]:
    """The kernel variants a launch with feature dim ``d``, ``x_dtype`` queries and a ``bank_dtype`` bank compiles on
    compute capability ``arch`` (its config table, or ``config``; k padded to :data:`AOT_KP`), for ahead-of-time
    checks. Same dict layout as ``bank_softmax_stats.aot_specs``."""
    plan = dot_plan(x_dtype, bank_dtype)
    specs = []
    tag = f"D={d},x={str(x_dtype)[6:]},bank={str(bank_dtype)[6:]}"
    for kp in AOT_KP if (x_dtype, bank_dtype) == (torch.float32, torch.float16) else AOT_KP[:1]:
        scan = {
            "N": "i32", "K": "i32", "D": "i32", "stride_q": "i32", "stride_bank": "i32", "keys_per_split": "i32",
        }  # fmt: skip
        pointers = {"q_ptr": _TRITON_TYPE[x_dtype], "bank_ptr": _TRITON_TYPE[bank_dtype], "keys_ptr": "*i64"}
        tile_list = {"tiles_ptr": "*i32", "tile_counts_ptr": "*i32", "floor_ptr": "*fp32"}
        kernels = [  # (name, kernel, algorithm, signature, extra constexprs, arguments divisible by 16)
            *(
                (
                    f"partial[{tag},KP={kp},TILE_LIST={listed}{config_tag(config)}]",
                    _bank_topk_partial_kernel,
                    "two_pass" if listed else "one_pass",
                    {**pointers, **tile_list, **scan, "tiles_stride": "i32", "k": "i32"},
                    {"TILE_LIST": listed},
                    (0, 1, 2, 3, 4, 5, 8, 9, 10, 11),
                )
                for listed in (False, True)
            ),
            (
                f"tile_max[{tag},KP={kp}{config_tag(config)}]",
                _bank_topk_tile_max_kernel,
                "two_pass",
                {**pointers, **scan, "k": "i32"},
                {},
                (0, 1, 2, 5, 6, 7, 8),
            ),
        ]
        for name, fn, algorithm, signature, extra, divisible in kernels:
            cfg = config or pick_config(d, plan, arch, algorithm)
            constexprs = _partial_constexprs(plan, d, kp, _rows_per_program(cfg, kp), cfg.block_k, cfg.block_dc)
            specs.append(
                {
                    "name": name,
                    "fn": fn,
                    "signature": {**signature, **{key: "constexpr" for key in {**constexprs, **extra}}},
                    "constexprs": {**constexprs, **extra},
                    "attrs": {(i,): [["tt.divisibility", 16]] for i in divisible},
                    "num_warps": cfg.num_warps,
                    "num_stages": cfg.num_stages,
                }
            )
        signature = {
            "keys_ptr": "*i64", "values_ptr": "*fp32", "indices_ptr": "*i64", "N": "i32", "NUM_SPLITS": "i32",
            "k": "i32", "LOG_KP": "constexpr", "LOG_BLOCK_N": "constexpr",
        }  # fmt: skip
        specs.append(
            {
                "name": f"merge[KP={kp}]",
                "fn": _bank_topk_merge_kernel,
                "signature": signature,
                "constexprs": {"LOG_KP": _log2(kp), "LOG_BLOCK_N": _log2(_merge_block_n(kp))},
                "attrs": {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2)},
                "num_warps": 4,
                "num_stages": 1,
            }
        )
    return specs


def _log2(v: int) -> int:
    if v < 1 or v & (v - 1):
        raise ValueError(f"block sizes must be powers of two, got {v}")
    return v.bit_length() - 1


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def bank_topk(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_dc: int | None = None,
    allow_tf32: bool = False,
    algorithm: str = "one_pass",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k bank rows by dot product, with indices.

    Args:
        query: (N, D) fp16/bf16/fp32 queries (the caller normalises for cosine similarity).
        bank: (K, D) fp16/bf16/fp32 bank rows, last dim contiguous, 1 <= k <= K <= 2^31 - 2^24.
        k: number of neighbours, 1 <= k <= 256.
        num_splits, block_n, block_k, num_warps, num_stages, block_dc: override the config table (tests use small
            blocks; ``block_dc`` is the D-chunk of the dot, 0 for the whole row; ``num_splits`` sets the bank splits
            of the scan, the two-pass search's first pass).
        allow_tf32: single TF32 products for fp32 inputs (default 3xTF32, fp32-accurate).
        algorithm: "one_pass" streams the selection with the scan; "two_pass" first finds each row's k bank tiles
            of largest maximum, then selects exactly within its row block's union of them (module docstring). Same
            result, bit for bit, under the same launch config (on sm_90 at D = 512 with fp32 queries the two-pass
            search defaults to a D-chunked one, ``TWO_PASS_SM90``, whose sums may round differently).

    Returns:
        values: (N, k) fp32 similarities q·b, descending.
        indices: (N, k) int64 bank row indices; equal values are ordered by ascending index.
    """
    if query.dim() != 2 or bank.dim() != 2:
        raise ValueError(f"query and bank must be 2-D, got {tuple(query.shape)} and {tuple(bank.shape)}")
    n, d = query.shape
    num_keys = bank.shape[0]
    if bank.shape[1] != d:
        raise ValueError(f"feature dims differ: query {tuple(query.shape)}, bank {tuple(bank.shape)}")
    for name, t in (("query", query), ("bank", bank)):
        if t.dtype not in _TRITON_TYPE:
            raise TypeError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if bank.device != query.device:
        raise ValueError(f"bank is on {bank.device}, query on {query.device}")
    if not 1 <= k <= min(num_keys, MAX_K):
        raise ValueError(f"k must be in [1, min(K={num_keys}, {MAX_K})], got {k}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if num_keys > 2**31 - 2**24:  # split bounds and the loop counter are int32 (with a margin for padding)
        raise ValueError(f"bank has {num_keys} rows; at most 2^31 - 2^24 are supported (32-bit indices and bounds)")

    device = query.device
    values = torch.empty(n, k, dtype=torch.float32, device=device)
    indices = torch.empty(n, k, dtype=torch.int64, device=device)
    if n == 0:
        return values, indices
    query = query if query.stride(-1) == 1 else query.contiguous()
    bank = bank if bank.stride(-1) == 1 else bank.contiguous()

    plan = dot_plan(query.dtype, bank.dtype, allow_tf32)
    cfg = pick_config(d, plan, device_arch(device), algorithm)
    kp = triton.next_power_of_2(k)
    block_n = block_n or _rows_per_program(cfg, kp)
    block_k = block_k or cfg.block_k
    num_warps = num_warps or cfg.num_warps
    num_stages = num_stages or cfg.num_stages
    block_dc = cfg.block_dc if block_dc is None else block_dc
    if num_splits is None:
        target = triton.cdiv(2 * _num_sms(device), triton.cdiv(n, block_n))
        num_splits = max(1, min(target, triton.cdiv(triton.cdiv(num_keys, block_k), MIN_BLOCKS_PER_SPLIT), MAX_SPLITS))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    keys_per_split = triton.cdiv(triton.cdiv(num_keys, num_splits), block_k) * block_k

    grid = (triton.cdiv(n, block_n), num_splits)
    scan_args = (n, num_keys, d, query.stride(0), bank.stride(0), keys_per_split)
    constexprs = _partial_constexprs(plan, d, kp, block_n, block_k, block_dc)
    launch = {"num_warps": num_warps, "num_stages": num_stages}
    keys = torch.empty(num_splits, n, kp, dtype=torch.int64, device=device)
    if algorithm == "one_pass":
        # the tile-list arguments are unused: placeholders of their dtypes (the signature tests/test_kernels_aot.py
        # compiles)
        unused_i32, unused_f32 = values.new_empty(1, dtype=torch.int32), values.new_empty(1)
        _bank_topk_partial_kernel[grid](
            query, bank, keys, unused_i32, unused_i32, unused_f32, *scan_args, 0, k, **constexprs, TILE_LIST=False,
            **launch,
        )  # fmt: skip
        _merge(keys, values, indices, k)
        return values, indices

    # -- two passes: (1) the k tiles of largest maximum per row, (2) exact top-k within each row block's union of them
    _bank_topk_tile_max_kernel[grid](query, bank, keys, *scan_args, k, **constexprs, **launch)
    tile_values = torch.empty(n, k, dtype=torch.float32, device=device)
    tile_ids = torch.empty(n, k, dtype=torch.int64, device=device)
    _merge(keys, tile_values, tile_ids, k)
    tiles, tile_counts, floor = _candidate_tiles(tile_values, tile_ids, block_n)
    # second pass: each row block's list (about BLOCK_N·k tiles) shared out among enough programs to fill the GPU
    # twice over (num_splits applies to the first pass only)
    splits = max(1, min(triton.cdiv(2 * _num_sms(device), grid[0]), tiles.shape[1], MAX_SPLITS))
    keys = torch.empty(splits, n, kp, dtype=torch.int64, device=device)
    _bank_topk_partial_kernel[(grid[0], splits)](
        query, bank, keys, tiles, tile_counts, floor, *scan_args, tiles.shape[1], k, **constexprs, TILE_LIST=True,
        **launch,
    )  # fmt: skip
    _merge(keys, values, indices, k)
    return values, indices
