r"""(LSE, μ) of each rank's query rows over a bank split across ranks (the sharded-bank mode).

Rank r holds shard B_r (K_r rows); the loss is that of the full bank B = ∪_r B_r. For a row x with inverse
temperature 1/τ and per-shard statistics

    LSE_r = log Σ_{j∈B_r} exp(x·b_j/τ),   μ_r = Σ_{j∈B_r} softmax_r(x·b_j/τ) b_j,

the full-bank statistics are the logsumexp merge FlashAttention's split-K uses (and fastssl.kernels' merge kernel):

    M = max_r LSE_r,   w_r = exp(LSE_r − M),   LSE = M + log Σ_r w_r,   μ = Σ_r w_r μ_r / Σ_r w_r.

So every rank all-gathers the query rows (N_total × D, small next to the bank), computes the partials of all rows on
its own shard with :func:`~fastssl.ops.bank_softmax_stats.bank_softmax_stats`, and three all-reduces (one max, two
sums) give every rank the merged statistics, of which it keeps its own rows. The bank never moves; the gradient the
loss ops derive from (LSE, μ) is local, so backward needs no communication. A positive key (InfoNCE) belongs to the
softmax once, not once per shard: only rank 0 adds it to its partial.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastssl.collectives import all_gather_ints, all_gather_rows, comm_device
from fastssl.ops.bank_softmax_stats import bank_softmax_stats


def sharded_bank_softmax_stats(
    x: torch.Tensor,
    inv_tau: torch.Tensor,
    shard: torch.Tensor,
    pos: torch.Tensor | None = None,
    *,
    backend: str = "streaming",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row LSE and μ of this rank's rows against the union of every rank's bank shard.

    Every rank of the default process group must call this (with its own rows; row counts may differ).

    Args:
        x: (N, D) this rank's query rows.
        inv_tau: (N,) per-row inverse temperatures 1/τ.
        shard: (K_r, D) this rank's bank rows (K_r ≥ 1; shards may differ in size).
        pos: optional (N, D) positive keys (InfoNCE), on every rank or on none.
        backend: ``"streaming"`` or ``"triton"`` (already resolved), for the local partials.

    Returns:
        lse: (N,) and mu: (N, D) in the accumulation dtype, equal (to rounding) to the statistics over the
        concatenated bank.

    Raises:
        ValueError: on every rank, if any rank's shard is empty, ranks disagree on passing ``pos``, or a rank's
            ``inv_tau`` / ``pos`` rows do not match its ``x`` rows.
    """
    device = comm_device(x)
    has_pos = pos is not None
    # One agreement round before the other collectives (a rank raising alone would leave the others waiting), with
    # one device read: whether each rank's shard is empty, whether it passed a positive key, and its row count.
    rows_match = inv_tau.shape[:1] == x.shape[:1] and (pos is None or pos.shape[:1] == x.shape[:1])
    votes = all_gather_ints([int(shard.shape[0] == 0), int(has_pos), x.shape[0], int(not rows_match)], device)
    empty_shards, pos_votes = sum(v[0] for v in votes), sum(v[1] for v in votes)
    if any(v[3] for v in votes):
        raise ValueError("sharded bank: a rank's inv_tau or pos rows do not match its query rows")
    if empty_shards:
        raise ValueError("sharded bank: a rank's shard has no valid rows yet (enqueue on every rank first)")
    if pos_votes not in (0, dist.get_world_size()):
        raise ValueError("sharded bank: some ranks passed a positive key and others did not")

    counts = [v[2] for v in votes]
    x_all, _ = all_gather_rows(x, counts=counts)
    inv_tau_all, _ = all_gather_rows(inv_tau, counts=counts)
    pos_all = all_gather_rows(pos, counts=counts)[0] if has_pos else None
    pos_here = pos_all if dist.get_rank() == 0 else None  # the positive enters one shard's partial only
    lse, mu = bank_softmax_stats(x_all, inv_tau_all, shard, pos_here, backend=backend)

    m = lse.to(device, copy=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    w = torch.exp(lse - m.to(lse.device))
    den = w.to(device, copy=True)
    num = (w[:, None] * mu).to(device, copy=True)
    dist.all_reduce(den)
    dist.all_reduce(num)
    start = sum(counts[: dist.get_rank()])
    rows = slice(start, start + x.shape[0])
    lse_full = (m + torch.log(den))[rows].to(lse.device)
    mu_full = (num / den[:, None])[rows].to(mu.device)
    return lse_full, mu_full
