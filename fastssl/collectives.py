"""Row-wise collectives shared by the memory bank and the sharded-bank ops: uneven batches, gloo or NCCL."""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed_world() -> int:
    """World size of the default process group, 1 when torch.distributed is not initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def comm_device(like: torch.Tensor) -> torch.device:
    """Where collectives on ``like`` run: its own device under NCCL, the CPU under gloo."""
    return like.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (the same length on every rank), in rank order, with one all-gather and one read."""
    local = torch.tensor(values, dtype=torch.long, device=device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts).tolist()


def all_gather_rows(
    t: torch.Tensor, out_device: torch.device | None = None, counts: list[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Concatenates every rank's ``t`` (rows may differ per rank, other dims may not) in rank order.

    all_gather needs equal shapes, so each rank pads to the largest row count first.

    Args:
        t: (rows, ...) this rank's part.
        out_device: where the result goes (default: t's device).
        counts: every rank's row count, when the caller already exchanged them (saves an all-gather and a device
            read); it must be what every rank passes as ``t`` (the caller agrees on that across ranks first: a
            mismatch here raises on this rank only).

    Returns:
        (sum of rows, *t.shape[1:]) tensor on ``out_device``, and the row count of each rank.
    """
    comm = comm_device(t)
    if counts is None:
        counts = [row[0] for row in all_gather_ints([t.shape[0]], comm)]
    elif counts[dist.get_rank()] != t.shape[0]:  # a caller's bug; checking the agreed counts is the caller's job
        raise ValueError(f"all_gather_rows: {t.shape[0]} rows here, but counts say {counts[dist.get_rank()]}")
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=comm)
    padded[: t.shape[0]] = t.to(comm)
    parts = [torch.empty_like(padded) for _ in range(len(counts))]
    dist.all_gather(parts, padded)
    gathered = torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])
    return gathered.to(out_device if out_device is not None else t.device), counts


def agree(ok: bool, device: torch.device) -> bool:
    """True on every rank iff ``ok`` is true on every rank (one all-reduce), so no rank enters a collective alone."""
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    return int(flag) == 0
