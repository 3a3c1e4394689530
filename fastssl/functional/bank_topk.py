"""Functional exact top-k against a bank (MSF, NNCLR, purity, kNN evaluation)."""

from __future__ import annotations

import torch

from fastssl.bank import MemoryBank
from fastssl.functional.inputs import bank_rows, check_embeddings, normalized, query_dtype_for
from fastssl.ops.bank_topk import bank_topk as bank_topk_op


def bank_topk(
    query: torch.Tensor,
    bank: torch.Tensor | MemoryBank,
    k: int,
    *,
    normalize: bool = True,
    backend: str = "auto",
    query_precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine similarities of each query against the bank rows, with indices.

    Args:
        query: (N, D) queries (L2-normalized here unless ``normalize=False``); no gradient.
        bank: (K, D) tensor or :class:`~fastssl.MemoryBank` (its valid rows), used as stored.
        k: neighbours per query, 1 ≤ k ≤ K.
        normalize: normalize the queries first.
        backend: ``"auto"`` | ``"reference"`` | ``"streaming"`` | ``"triton"``.
        query_precision: ``"float32"`` (default: fp32-accurate similarities; the kernel splits each query into two
            or three 16-bit terms) or ``"bank"``: the (normalized) queries are rounded to a 16-bit bank's dtype first,
            so the kernel needs one tensor-core dot per tile. Every backend then ranks by the rounded queries'
            similarities (the values returned are those), which can reorder neighbours whose similarities differ by
            less than about the rounding (2^-11 relative for fp16). fp32/fp64 banks and fp64 queries are not rounded.

    Returns:
        values: (N, k) similarities, descending, fp32 (fp64 for fp64 inputs).
        indices: (N, k) int64 indices into the bank's valid rows; equal similarities keep the lower index first.
    """
    check_embeddings("query", query)
    rows = bank_rows(bank, query)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= rows.shape[0]:
        raise ValueError(f"k must be an int in [1, {rows.shape[0]}] (the bank's valid rows), got {k!r}")
    query_dtype = query_dtype_for(rows, query, query_precision)
    q = normalized(query.detach()) if normalize else query.detach()
    return bank_topk_op(q if query_dtype is None else q.to(query_dtype), rows, k, backend=backend)
