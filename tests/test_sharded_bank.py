"""Sharded-bank mode under a real 2-process gloo group against a single process holding the whole bank.

Each rank keeps its own shard (uneven batch sizes: 3 and 5 rows per step) and computes ISD, ReSSL and MoCo losses of
its own rows; the oracle is the fp64 materializing reference over the concatenated shards. The merge of the per-shard
(LSE, μ) partials is exact math, so losses and gradients must agree to fp64 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backends import STATS_BACKENDS
from ports import free_port

from fastssl import MemoryBank
from fastssl.functional import isd_loss, moco_loss, msf_loss, ressl_loss
from fastssl.ops.soft_bank_cross_entropy import soft_bank_cross_entropy as soft_bank_cross_entropy_op

WORLD = 2
DIM = 8
STEPS = 3
LOSSES = {
    "isd": lambda s, t, bank, backend: isd_loss(s, t, bank, backend=backend),
    "ressl": lambda s, t, bank, backend: ressl_loss(s, t, bank, backend=backend),
    "moco": lambda s, t, bank, backend: moco_loss(s, t, bank, backend=backend),
}


def rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    n = 3 + 2 * rank
    return torch.randn(n, DIM, generator=g, dtype=torch.float64), torch.randn(n, DIM, generator=g, dtype=torch.float64)


def worker(rank: int, port: int, out_dir: str, backends: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        bank = MemoryBank(7, DIM, dtype=torch.float64, init="random", sharded=True)
        records = []
        for step in range(STEPS):
            student, teacher = rank_batch(rank, step)
            shard = bank.keys.clone()
            for name, loss_fn in LOSSES.items():
                for backend in backends:
                    s = student.clone().requires_grad_()
                    loss = loss_fn(s, teacher, bank, backend)
                    loss.backward()
                    records.append((step, name, backend, shard, loss.detach(), s.grad))
            bank.enqueue(teacher)  # official order: loss first, then this rank's keys into its own shard
        # Top-k methods need the whole bank: a clear error, on every rank.
        try:
            msf_loss(student, teacher, bank, 2)
            topk_error = ""
        except ValueError as error:
            topk_error = str(error)
        # An empty shard on one rank: every rank raises instead of waiting in a collective.
        empty = MemoryBank(4, DIM, dtype=torch.float64, init="empty", sharded=True)
        if rank == 0:
            empty.enqueue(torch.randn(2, DIM, dtype=torch.float64))
        else:
            empty.enqueue(torch.randn(0, DIM, dtype=torch.float64))
        try:
            isd_loss(student, teacher, empty, backend="streaming")
            empty_error = ""
        except ValueError as error:
            empty_error = str(error)
        # A bad input on rank 1 only (wrong key width): both ranks raise, rank 0 naming the other rank.
        try:
            moco_loss(student, teacher if rank == 0 else teacher[:, :4], bank, backend="streaming")
            bad_error = ""
        except ValueError as error:
            bad_error = str(error)
        torch.save(
            {
                "records": records,
                "topk_error": topk_error,
                "empty_error": empty_error,
                "bad_error": bad_error,
                "shard": bank.keys.clone(),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_sharded_losses_equal_the_whole_bank(tmp_path):
    backends = [b for b in STATS_BACKENDS if b != "triton"]  # the kernels have no fp64; test_sharded_bank_triton
    mp.start_processes(worker, args=(free_port(), str(tmp_path), backends), nprocs=WORLD, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    per_rank = [r["records"] for r in results]
    assert len(per_rank[0]) == len(per_rank[1]) == STEPS * len(LOSSES) * len(backends)
    for rec0, rec1 in zip(*per_rank, strict=True):
        step, name, backend = rec0[:3]
        whole = torch.cat([rec0[3], rec1[3]])  # the union of the shards the losses saw at this step
        for rank, rec in enumerate((rec0, rec1)):
            student, teacher = rank_batch(rank, step)
            s = student.clone().requires_grad_()
            expected = LOSSES[name](s, teacher, whole, "reference")
            expected.backward()
            case = f"{name} {backend} step={step} rank={rank}"
            torch.testing.assert_close(rec[4], expected.detach(), rtol=1e-12, atol=1e-12, msg=case)
            torch.testing.assert_close(rec[5], s.grad, rtol=1e-10, atol=1e-12, msg=case)
    # Each shard holds only its own rank's keys: 7 random rows overwritten by 3 steps of 3 (rank 0) / 5 (rank 1) keys.
    for rank in range(WORLD):
        latest = torch.nn.functional.normalize(torch.cat([rank_batch(rank, step)[1] for step in range(STEPS)]), dim=1)
        shard = results[rank]["shard"]
        assert all(any(torch.equal(row, key) for key in latest) for row in shard[: min(7, latest.shape[0])])
        assert "sharded" in results[rank]["topk_error"]
        assert "no valid rows" in results[rank]["empty_error"]
    assert "another rank" in results[0]["bad_error"] and "has shape" in results[1]["bad_error"]


def test_sharded_needs_a_merging_backend():
    s, t, bank = torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="streaming"):
        soft_bank_cross_entropy_op(s, t, bank, 0.1, 0.04, backend="reference", sharded=True)
