"""MemoryBank under a real 2-process gloo group: identical banks on every rank, rank-order FIFO, agreed errors."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from ports import free_port

from fastssl import MemoryBank
from fastssl.bank import NonFiniteKeysError

WORLD = 2


def rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic batch per (rank, step); ranks use different batch sizes (3 and 5)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = 3 + 2 * rank
    return torch.randn(n, 4, generator=g), torch.arange(n) + 10 * rank + 100 * step


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        bank = MemoryBank(11, 4, dtype=torch.float32, init="empty", store_labels=True)
        for step in range(3):
            bank.enqueue(*rank_batch(rank, step))
        # A bad batch on rank 1 only: both ranks must raise (nobody hangs in the all-gather) and keep their bank.
        before = bank.queue.clone()
        bad = torch.randn(2, 5) if rank == 1 else torch.randn(2, 4)
        try:
            bank.enqueue(bad)
            raised = ""
        except ValueError as error:
            raised = str(error)
        unchanged = torch.equal(bank.queue, before)
        # NaN keys on rank 1 only (a diverged model): every rank raises the non-finite error type the trainer catches.
        diverged = torch.full((2, 4), float("nan")) if rank == 1 else torch.randn(2, 4)
        try:
            bank.enqueue(diverged)
            non_finite = ""
        except NonFiniteKeysError as error:
            non_finite = type(error).__name__
        unchanged = unchanged and torch.equal(bank.queue, before)
        torch.save(
            {"state": bank.state_dict(), "raised": raised, "unchanged": unchanged, "non_finite": non_finite},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_rank_banks_are_identical_and_fifo_in_rank_order(tmp_path):
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in ("queue", "ptr", "count", "label_queue"):
        assert torch.equal(results[0]["state"][name], results[1]["state"][name]), name

    # Oracle: one process enqueueing the rank-ordered concatenation of every step's batches.
    oracle = MemoryBank(11, 4, dtype=torch.float32, init="empty", store_labels=True)
    for step in range(3):
        keys, labels = zip(*(rank_batch(r, step) for r in range(WORLD)), strict=True)
        oracle.enqueue(torch.cat(keys), torch.cat(labels))
    assert torch.equal(results[0]["state"]["queue"], oracle.queue)
    assert torch.equal(results[0]["state"]["label_queue"], oracle.label_queue)
    torch.testing.assert_close(oracle.keys.norm(dim=1), torch.ones(11))
    expected_first = F.normalize(rank_batch(0, 2)[0], dim=1)  # step 2: 8 rows written at ptr 5 → rows 5..10, 0..1
    assert torch.equal(oracle.queue[5:8], expected_first)

    assert "dim 5" in results[1]["raised"]
    assert "another rank" in results[0]["raised"]
    assert results[0]["unchanged"] and results[1]["unchanged"]
    assert [r["non_finite"] for r in results] == ["NonFiniteKeysError"] * 2
