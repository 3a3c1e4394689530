"""Shuffling BN across 2 gloo ranks: each rank's teacher outputs equal a single-process oracle that runs the teacher
on the permuted global batch, share by share, and puts the outputs back in order."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port
from torch import nn

from fastssl.train.shuffle_bn import shuffle_permutation, shuffled_forward

WORLD, B, SEED, CALL = 2, 5, 7, 3


def teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))  # train mode: BN uses the batch's statistics


def rank_batch(rank: int) -> torch.Tensor:
    return torch.randn(B, 4, generator=torch.Generator().manual_seed(100 + rank))


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        y = shuffled_forward(teacher(), rank_batch(rank), seed=SEED, call=CALL)
        torch.save(y, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_shuffled_teacher_equals_the_permuted_oracle(tmp_path):
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x = torch.cat([rank_batch(r) for r in range(WORLD)])
    order = shuffle_permutation(WORLD * B, SEED, CALL)
    net = teacher()
    with torch.no_grad():
        shuffled = torch.cat([net(x[order[r * B : (r + 1) * B]]) for r in range(WORLD)])
    expected = torch.empty_like(shuffled)
    expected[order] = shuffled
    for r in range(WORLD):
        torch.testing.assert_close(got[r], expected[r * B : (r + 1) * B], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        unshuffled = net(rank_batch(0))
    assert not torch.allclose(got[0], unshuffled)  # the BN batches really were mixed across ranks


def test_one_rank_is_not_shuffled():
    """With one process the teacher sees the whole batch, whose BN statistics do not depend on the order."""
    net, x = teacher(), rank_batch(0)
    with torch.no_grad():
        assert torch.equal(shuffled_forward(net, x, seed=SEED, call=CALL), net(x))


def test_permutations_differ_by_call_and_repeat_by_seed():
    assert torch.equal(shuffle_permutation(64, 1, 5), shuffle_permutation(64, 1, 5))
    assert not torch.equal(shuffle_permutation(64, 1, 5), shuffle_permutation(64, 1, 6))
    assert sorted(shuffle_permutation(64, 1, 5).tolist()) == list(range(64))
