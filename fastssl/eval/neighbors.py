"""Exact cosine k-nearest-neighbour search of test features among train features, with interchangeable backends.

Every backend only *proposes* candidates: FAISS on GPU (flat inner product, fp16 storage, sharded over all visible
GPUs), FAISS on CPU (flat inner product, fp32), chunked torch matmul + top-k (GPU or CPU), or fastssl's Triton top-k
kernel. Each returns its k' = 2k + 8 best train rows under its own floating-point arithmetic, which differs between
backends in the last bits. The candidates are then re-scored with one *canonical* similarity

    s(q, b) = Σ_d q_d b_d / (‖q‖ ‖b‖)   in fp64, products exact, sums in a fixed pairwise-tree order,

which is bitwise identical on every device and for every batch shape (only IEEE-rounded elementwise fp64 ops), and
sorted by (s descending, train index ascending). If a backend's similarities are within ε of s, a non-proposed train
row j has s_j ≤ s̃_j + ε ≤ s̃_last + ε, where s̃_last is the weakest proposed similarity. Hence a query row is
*certified* when

    s̃_last + ε < s_(k)    (the k-th re-scored similarity),

and then its k neighbours are exactly the canonical top-k whatever backend proposed them; the strict inequality also
settles ties at s_(k) in favour of lower indices. Uncertified rows (near-duplicate train features) are proposed again
with 4x more candidates and finally searched exhaustively with the canonical similarity (within a work budget; beyond
it, as for a collapsed representation with thousands of exactly tied rows, the tie-break among equal similarities is
logged as not guaranteed identical across backends). No path ever holds the full
test × train score matrix: scores exist one (query block × train block) at a time.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss-gpu", "faiss-cpu", "torch", "triton")
DEFAULT_CHUNK_SIZE = 65536  # train rows per score block
_SCORE_BLOCK_ELEMENTS = {"cpu": 2**24, "cuda": 2**28}  # query rows per block = this // chunk_size
_RESCORE_BLOCK_BYTES = 2**27  # fp64 bytes gathered per re-scoring block
_MAX_PROPOSAL_ROUNDS = 3  # k' = 2k + 8, then ×4, ×4, then exhaustive
_EXHAUSTIVE_BUDGET = 2**33  # fp64 products allowed for the exhaustive pass (~1 min on 2 CPU cores)
_EXHAUSTIVE_ROWS = 64  # query rows per exhaustive pass
_FAISS_GPU_MAX_K = 2048  # FAISS GPU k-selection limit


@dataclass(frozen=True)
class Neighbors:
    """Result of :func:`nearest_neighbors`.

    Attributes:
        similarities: (N_test, k) fp64 canonical cosine similarities, descending.
        indices: (N_test, k) int64 train indices; equal similarities ordered by lower index.
        backend: the backend that proposed the candidates (``"auto"`` resolved).
    """

    similarities: torch.Tensor
    indices: torch.Tensor
    backend: str


def as_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Zero-copy view of a numpy array as a tensor; tensors pass through."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    return x


def validate_features(train: torch.Tensor, test: torch.Tensor, k: int) -> None:
    """Clear errors for the inputs every kNN entry point shares.

    Raises:
        TypeError: non-floating or mismatched dtypes.
        ValueError: wrong rank, dimension mismatch, k out of range, NaN/inf or zero-norm rows.
    """
    for name, x in (("train_features", train), ("test_features", test)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if train.dtype != test.dtype:
        raise TypeError(
            f"train_features and test_features must share a dtype, got {train.dtype} and {test.dtype}; "
            "extract both with the same settings or cast one of them"
        )
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"feature dimensions differ: train has D={train.shape[1]}, test has D={test.shape[1]}")
    if train.device != test.device:
        raise ValueError(f"train_features is on {train.device} but test_features on {test.device}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > train.shape[0]:
        raise ValueError(f"k={k} is larger than the number of train features ({train.shape[0]})")
    for name, x in (("train_features", train), ("test_features", test)):
        for start in range(0, x.shape[0], 1 << 16):
            block = x[start : start + (1 << 16)]
            finite = torch.isfinite(block).all(dim=1)
            if not bool(finite.all()):
                row = start + int((~finite).nonzero()[0, 0])
                raise ValueError(f"{name} contains NaN or inf (first at row {row})")
            zero = (block == 0).all(dim=1)
            if bool(zero.any()):
                row = start + int(zero.nonzero()[0, 0])
                raise ValueError(f"{name} row {row} is all zeros: cosine similarity is undefined")


# ---------------------------------------------------------------------------------------------- canonical similarity


def _pairwise_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in a fixed binary-tree order (zero-padded to a power of two): shape-independent bits."""
    d = x.shape[-1]
    width = 1 << max(d - 1, 0).bit_length()
    if width != d:
        x = F.pad(x, (0, width - d))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def canonical_norms(x: torch.Tensor) -> torch.Tensor:
    """(N,) fp64 L2 norms of the rows of x (any float dtype), in the canonical summation order."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, _RESCORE_BLOCK_BYTES // (8 * max(x.shape[1], 1)))
    for start in range(0, x.shape[0], step):
        block = x[start : start + step].double()
        out[start : start + step] = _pairwise_sum(block * block).sqrt()
    return out


def canonical_similarity(
    query: torch.Tensor, query_norms: torch.Tensor, train: torch.Tensor, train_norms: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Canonical cosine similarity of each query row with its candidate train rows.

    Args:
        query: (R, D) query rows (any float dtype; fp16/bf16/fp32 products are exact in fp64).
        query_norms: (R,) fp64 canonical norms of the query rows.
        train: (N, D) all train rows.
        train_norms: (N,) fp64 canonical norms of the train rows.
        index: (R, C) int64 candidate train indices.

    Returns:
        (R, C) fp64 similarities.
    """
    out = torch.empty(index.shape, dtype=torch.float64, device=index.device)
    per_row = max(1, index.shape[1] * train.shape[1] * 8)
    step = max(1, _RESCORE_BLOCK_BYTES // per_row)
    for start in range(0, index.shape[0], step):
        idx = index[start : start + step]
        q = query[start : start + step].double()
        b = train[idx.reshape(-1)].double().view(idx.shape[0], idx.shape[1], -1)
        dots = _pairwise_sum(q[:, None, :] * b)
        out[start : start + step] = dots / (query_norms[start : start + step, None] * train_norms[idx])
    return out


def _sort_candidates(sims: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (similarity desc, index asc): stable sort of index-ascending rows."""
    index, order = torch.sort(index, dim=1)
    sims = sims.gather(1, order)
    sims, order = torch.sort(sims, dim=1, descending=True, stable=True)
    return sims, index.gather(1, order)


def _exhaustive_canonical(
    query: torch.Tensor, query_norms: torch.Tensor, train: torch.Tensor, train_norms: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact canonical top-k of a few query rows over every train row (the last-resort path; O(R·N·D) fp64)."""
    r = query.shape[0]
    best_s = torch.empty(r, 0, dtype=torch.float64, device=query.device)
    best_i = torch.empty(r, 0, dtype=torch.long, device=query.device)
    step = max(1, _RESCORE_BLOCK_BYTES // max(1, r * train.shape[1] * 8))
    for start in range(0, train.shape[0], step):
        idx = torch.arange(start, min(start + step, train.shape[0]), device=query.device).expand(r, -1)
        sims = canonical_similarity(query, query_norms, train, train_norms, idx)
        # Running entries all have lower indices than the new block and ties inside each part are index-ascending,
        # so a stable sort of the concatenation keeps (sim desc, index asc).
        best_s, order = torch.sort(torch.cat([best_s, sims], 1), dim=1, descending=True, stable=True)
        best_i = torch.cat([best_i, idx], 1).gather(1, order)
        best_s, best_i = best_s[:, :k], best_i[:, :k]
    return best_s, best_i


# ---------------------------------------------------------------------------------------------- backends


@functools.cache
def _faiss():
    if importlib.util.find_spec("faiss") is None:
        return None
    import faiss

    return faiss


def faiss_num_gpus() -> int:
    """Number of GPUs FAISS can use (0 for faiss-cpu builds or no FAISS)."""
    faiss = _faiss()
    if faiss is None or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def _triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if importlib.util.find_spec("fastssl.kernels.bank_topk") is None:
        return False  # the Triton top-k kernel is not part of this build
    from fastssl.ops.backend import triton_interpreter_enabled

    return device.type == "cuda" or triton_interpreter_enabled()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Concrete backend for features on ``device``; ``"auto"`` picks the fastest one available.

    Order for ``"auto"``: FAISS GPU when FAISS sees a GPU; else, with CUDA, the Triton top-k (torch if Triton is
    missing); else FAISS CPU (about 2x faster than torch matmul + top-k on CPU); else torch.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the requested backend cannot run here (with the install hint).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if faiss_num_gpus() > 0:
            return "faiss-gpu"
        if torch.cuda.is_available():
            return "triton" if _triton_usable(torch.device("cuda")) else "torch"
        return "faiss-cpu" if _faiss() is not None else "torch"
    if backend == "faiss-cpu" and _faiss() is None:
        raise RuntimeError('backend="faiss-cpu" needs FAISS: pip install -e ".[faiss]"')
    if backend == "faiss-gpu" and faiss_num_gpus() == 0:
        raise RuntimeError(
            'backend="faiss-gpu" needs a GPU build of FAISS and a visible GPU: pip install -e ".[faiss-gpu]"'
        )
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError('backend="triton" needs triton: pip install -e ".[triton]"')
        if importlib.util.find_spec("fastssl.kernels.bank_topk") is None:
            raise RuntimeError('backend="triton" needs the fastssl.kernels.bank_topk kernel, missing from this build')
        if not _triton_usable(device):
            raise RuntimeError(
                'backend="triton" on CPU features runs only in Triton\'s interpreter (TRITON_INTERPRET=1 before '
                'importing fastssl); move the features to CUDA or use backend="torch"/"faiss-cpu"'
            )
    return backend


def _unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}.get(dtype, 2.0**-53)


def error_bound(storage: torch.dtype, output: torch.dtype, dim: int) -> float:
    """Worst-case |s̃ − s| of a backend that stores normalized rows in ``storage``, accumulates in fp32 and returns
    scores in ``output``.

    Rounding a unit vector to storage moves it by ≤ u_s, so each factor contributes u_s (plus the normalization's own
    rounding, another u_s); an fp32 dot product of unit vectors errs by ≤ D·u_32 (Higham's γ_D); the output rounding
    adds u_o. A factor 4 covers the second-order terms and inputs whose stored norm is not exactly one.
    """
    u_s, u_o = _unit_roundoff(storage), _unit_roundoff(output)
    return 4.0 * (4.0 * u_s + dim * 2.0**-24 + u_o) + 1e-12


def _normalized(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.normalize(x.float(), dim=1).to(dtype)


def _propose_torch(
    train: torch.Tensor, test: torch.Tensor, k: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Chunked matmul + top-k; train blocks outermost so each is normalized once. Computes in the input dtype on CUDA
    (tensor cores), in fp32 on CPU (no fast fp16 GEMM there)."""
    on_cuda = train.device.type == "cuda"
    compute = train.dtype if on_cuda and train.dtype in (torch.float16, torch.bfloat16) else torch.float32
    storage = compute
    if on_cuda and compute == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        storage = torch.float16  # TF32 keeps fp16's 10 mantissa bits: bound it like fp16 storage
    n_test = test.shape[0]
    q_step = max(1, min(n_test, _SCORE_BLOCK_ELEMENTS[train.device.type] // chunk_size))
    queries = [_normalized(test[s : s + q_step], compute) for s in range(0, n_test, q_step)]
    best_v = torch.full((n_test, 0), -math.inf, device=train.device)
    best_i = torch.empty(n_test, 0, dtype=torch.long, device=train.device)
    for t0 in range(0, train.shape[0], chunk_size):
        block = _normalized(train[t0 : t0 + chunk_size], compute)
        kb = min(k, block.shape[0])
        new_v, new_i = [], []
        for q in queries:
            v, i = torch.topk((q @ block.T).float(), kb, dim=1)
            new_v.append(v)
            new_i.append(i + t0)
        v = torch.cat([best_v, torch.cat(new_v)], 1)
        i = torch.cat([best_i, torch.cat(new_i)], 1)
        best_v, order = torch.topk(v, min(k, v.shape[1]), dim=1)
        best_i = i.gather(1, order)
    return best_v, best_i, error_bound(storage, compute, train.shape[1])


def _propose_triton(
    train: torch.Tensor, test: torch.Tensor, k: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """fastssl's fused Triton top-k over the whole train set per query block (scores never leave the kernel)."""
    from fastssl.ops.bank_topk import bank_topk

    storage = train.dtype if train.dtype in (torch.float16, torch.bfloat16) else torch.float32
    bank = _normalized(train, storage)
    q_step = max(1, min(test.shape[0], 65536))
    values, indices = [], []
    for s in range(0, test.shape[0], q_step):
        v, i = bank_topk(_normalized(test[s : s + q_step], storage), bank, k, backend="triton")
        values.append(v.float())
        indices.append(i.long())
    return torch.cat(values), torch.cat(indices), error_bound(storage, torch.float32, train.shape[1])


def _faiss_add(index, train: torch.Tensor, chunk_size: int) -> None:
    for t0 in range(0, train.shape[0], chunk_size):
        block = _normalized(train[t0 : t0 + chunk_size], torch.float32).cpu().numpy()
        index.add(np.ascontiguousarray(block))


def _faiss_search(index, test: torch.Tensor, k: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # FAISS blocks its own GEMMs; query blocks here only bound the fp32 copy of the queries.
    values, indices = [], []
    for s in range(0, test.shape[0], chunk_size):
        q = np.ascontiguousarray(_normalized(test[s : s + chunk_size], torch.float32).cpu().numpy())
        v, i = index.search(q, k)
        values.append(torch.from_numpy(v))
        indices.append(torch.from_numpy(i).long())
    return torch.cat(values).to(test.device), torch.cat(indices).to(test.device)


def _propose_faiss_cpu(
    train: torch.Tensor, test: torch.Tensor, k: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """FAISS IndexFlatIP over fp32 normalized rows (exact inner-product search, BLAS-blocked)."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(train.shape[1])
    _faiss_add(index, train, chunk_size)
    v, i = _faiss_search(index, test, k, chunk_size)
    return v, i, error_bound(torch.float32, torch.float32, train.shape[1])


def _propose_faiss_gpu(
    train: torch.Tensor, test: torch.Tensor, k: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """FAISS flat inner product on every visible GPU: fp16 storage, the train rows sharded across GPUs, each
    shard searched on its GPU and the per-shard top-k merged by FAISS (IndexShards)."""
    faiss = _faiss()
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = True
    index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(train.shape[1]), co=options)
    _faiss_add(index, train, chunk_size)
    v, i = _faiss_search(index, test, k, chunk_size)
    return v, i, error_bound(torch.float16, torch.float16, train.shape[1])  # fp16 GEMM output assumed


_PROPOSERS = {
    "torch": _propose_torch,
    "triton": _propose_triton,
    "faiss-cpu": _propose_faiss_cpu,
    "faiss-gpu": _propose_faiss_gpu,
}


def nearest_neighbors(
    train_features: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    k: int,
    *,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Neighbors:
    """Exact cosine top-k of each test row among the train rows; identical results for every backend.

    Args:
        train_features: (N_train, D) features (fp16/bf16/fp32/fp64; normalization not required).
        test_features: (N_test, D) features, same dtype and device.
        k: neighbours per test row, 1 ≤ k ≤ N_train.
        backend: ``"auto"``, ``"faiss-gpu"``, ``"faiss-cpu"``, ``"torch"`` or ``"triton"``.
        chunk_size: train rows per score block (the torch backend holds (queries × chunk_size) scores at a time).

    Returns:
        :class:`Neighbors` with (N_test, k) canonical fp64 similarities (descending, ties by lower train index),
        train indices, and the backend used. Tensors are on the features' device.

    Raises:
        TypeError, ValueError: see :func:`validate_features`; RuntimeError: backend unavailable.
    """
    train = as_tensor(train_features, "train_features")
    test = as_tensor(test_features, "test_features")
    validate_features(train, test, k)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    name = resolve_backend(backend, train.device)
    if backend == "auto":
        logger.info("kNN backend: auto -> %s", name)
    search_train, search_test = train, test
    if backend == "auto" and name in ("triton", "torch") and train.device.type == "cpu" and torch.cuda.is_available():
        search_train, search_test = train.cuda(), test.cuda()  # CPU features on a CUDA machine: search on the GPU

    with torch.no_grad():
        train_norms = canonical_norms(train)
        test_norms = canonical_norms(test)
        n_train, n_test = train.shape[0], test.shape[0]
        sims = torch.empty(n_test, k, dtype=torch.float64, device=train.device)
        index = torch.empty(n_test, k, dtype=torch.long, device=train.device)
        pending = torch.arange(n_test, device=train.device)
        k_prop = 2 * k + 8
        for _ in range(_MAX_PROPOSAL_ROUNDS):
            if pending.numel() == 0:
                break
            k_eff = min(k_prop, n_train, _FAISS_GPU_MAX_K if name == "faiss-gpu" else n_train)
            rows = pending.to(search_test.device)
            prop_v, prop_i, eps = _PROPOSERS[name](search_train, search_test[rows], k_eff, chunk_size)
            prop_v, prop_i = prop_v.to(train.device), prop_i.to(train.device)
            valid = (prop_i >= 0).all(dim=1)
            prop_i = prop_i.clamp_min(0)
            s = canonical_similarity(test[pending], test_norms[pending], train, train_norms, prop_i)
            s, i = _sort_candidates(s, prop_i)
            if k_eff == n_train:
                certified = valid  # every train row was proposed
            else:
                certified = valid & (prop_v[:, -1].double() + eps < s[:, k - 1])
            done = pending[certified]
            sims[done], index[done] = s[certified, :k], i[certified, :k]
            best_s, best_i = s[~certified, :k], i[~certified, :k]  # fallback if the exhaustive pass is too costly
            pending = pending[~certified]
            k_prop *= 4
        if pending.numel() > 0:
            work = pending.numel() * n_train * train.shape[1]
            if work <= _EXHAUSTIVE_BUDGET:
                logger.info("kNN: %d of %d rows searched exhaustively (near-tied train features)", len(pending), n_test)
                for r0 in range(0, pending.numel(), _EXHAUSTIVE_ROWS):
                    rows = pending[r0 : r0 + _EXHAUSTIVE_ROWS]
                    s, i = _exhaustive_canonical(test[rows], test_norms[rows], train, train_norms, k)
                    sims[rows], index[rows] = s, i
            else:
                # Hundreds of exactly tied neighbours (a collapsed representation): the exact lower-index tie-break
                # would cost a full fp64 pass per row, so keep the best re-scored candidates. Similarities are still
                # canonical; only which of the tied rows are listed may differ between backends.
                logger.warning(
                    "kNN: %d of %d rows have more than %d near-tied neighbours (collapsed features?); their tie-break "
                    "among equal similarities is not guaranteed identical across backends",
                    len(pending),
                    n_test,
                    k_prop // 4,
                )
                sims[pending], index[pending] = best_s, best_i
    return Neighbors(similarities=sims, indices=index, backend=name)
