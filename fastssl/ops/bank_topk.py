"""Exact top-k of query·bankᵀ with indices, ties broken by the lower bank index.

Used by MSF (neighbours of the target, Koohpayegani et al. 2021, arXiv:2105.07269), NNCLR (support-set nearest
neighbour, Dwibedi et al. 2021, arXiv:2104.14548), MSF purity and kNN evaluation.

Tie-breaking: a stable descending sort keeps equal values in input order. The streaming backend takes each chunk's
exact top-k (torch.topk for the k-th value, then the lowest-indexed ties), keeps its running top-k sorted by
(value desc, index asc), and appends each chunk's (all of whose indices are larger) before a stable sort, so the
invariant holds after every merge and equals a stable sort of the full row.

Non-finite similarities: every backend ranks NaN below every number, like the Triton kernel, which never selects a
NaN (or -inf) score: a NaN bank row is never a neighbour while a row has k larger scores, and a NaN query gets NaN
values. Where a row has fewer than k scores above -inf, the values of the missing neighbours are NaN or -inf and their
indices are unspecified (they differ between backends).
"""

from __future__ import annotations

import torch

from fastssl.ops.backend import accumulation_dtype, resolve_backend, triton_serves

DEFAULT_CHUNK = 16384


def _rank_key(values: torch.Tensor) -> torch.Tensor:
    """What the backends rank by: the similarity, with NaN below every number (as in the Triton kernel, which never
    selects a NaN score): a NaN bank row is no one's neighbour, and a NaN query's neighbours are all NaN."""
    return torch.where(values.isnan(), float("-inf"), values)


def _stable_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort(_rank_key(values), dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def bank_topk_reference(query: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Materializing oracle: full (N, K) similarity matrix, stable descending sort."""
    acc_dtype = accumulation_dtype(query, bank)
    sims = query.to(acc_dtype) @ bank.to(acc_dtype).T
    index = torch.arange(bank.shape[0], device=query.device).expand_as(sims)
    return _stable_topk(sims, index, k)


def _chunk_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of ``sims`` (N, c) by (value desc, column asc), without sorting the whole row.

    torch.topk finds the k-th largest value v_k but may pick any of several columns equal to it; so keep every column
    with value > v_k, then the lowest-indexed columns equal to v_k until each row has exactly k. Ranked by
    :func:`_rank_key` (NaN as -inf), so NaN scores never fail the count below.
    """
    key = _rank_key(sims)
    kth = key.topk(k, dim=1).values[:, -1:]  # (N, 1)
    above = key > kth
    equal = key == kth
    needed = k - above.sum(dim=1, keepdim=True)
    keep = above | (equal & (equal.cumsum(dim=1) <= needed))
    columns = keep.nonzero()[:, 1].view(sims.shape[0], k)  # ascending column order within each row
    return _stable_topk(sims.gather(1, columns), columns, k)


def bank_topk_streaming(
    query: torch.Tensor, bank: torch.Tensor, k: int, *, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked top-k with a running merge; memory O(N·(k + chunk))."""
    chunk_size = chunk_size or DEFAULT_CHUNK
    acc_dtype = accumulation_dtype(query, bank)
    q = query.to(acc_dtype)
    n = q.shape[0]
    best_values = q.new_empty(n, 0)
    best_index = torch.empty(n, 0, dtype=torch.long, device=q.device)
    for start in range(0, bank.shape[0], chunk_size):
        sims = q @ bank[start : start + chunk_size].to(acc_dtype).T  # (N, c)
        values, columns = _chunk_topk(sims, min(k, sims.shape[1]))
        # Running entries all have lower indices than this chunk's, so the stable sort keeps ties index-ordered.
        best_values, best_index = _stable_topk(
            torch.cat([best_values, values], dim=1), torch.cat([best_index, columns + start], dim=1), k
        )
    return best_values, best_index


def bank_topk(
    query: torch.Tensor, bank: torch.Tensor, k: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k similarities of each query row against the bank rows, exact, as stored (no normalization here).

    Args:
        query: (N, D) query rows.
        bank: (K, D) bank rows.
        k: neighbours per row, 1 ≤ k ≤ K.
        backend: see :mod:`fastssl.ops.backend`.

    Returns:
        values: (N, k) similarities, descending, fp32 (fp64 for fp64 inputs).
        indices: (N, k) int64 bank indices; equal values are ordered by lower index first.

    Registered as ``fastssl::bank_topk`` for torch.compile; eager calls skip the dispatcher.
    """
    backend = resolve_backend(backend, query, bank, triton_ok=triton_serves(bank, k=k), bank=bank)
    if backend == "reference":
        with torch.no_grad():
            return bank_topk_reference(query, bank, k)
    if torch.compiler.is_compiling():
        return _bank_topk_op(query, bank, k, backend)
    with torch.no_grad():
        return _bank_topk_impl(query, bank, k, backend)


def _bank_topk_impl(query: torch.Tensor, bank: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "streaming":
        return bank_topk_streaming(query, bank, k)
    from fastssl.kernels.bank_topk import bank_topk as launch

    return launch(query.contiguous(), bank if bank.stride(-1) == 1 else bank.contiguous(), k)


@torch.library.custom_op("fastssl::bank_topk", mutates_args=())
def _bank_topk_op(query: torch.Tensor, bank: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _bank_topk_impl(query, bank, k, backend)


@_bank_topk_op.register_fake
def _(query, bank, k, backend):
    acc_dtype = accumulation_dtype(query, bank)
    return query.new_empty(query.shape[0], k, dtype=acc_dtype), query.new_empty(query.shape[0], k, dtype=torch.long)
