"""Shuffling BN for the teacher's forward across ranks (MoCo, He et al. 2020, Sec. 3.3; ISD's and MSF's code).

With BatchNorm, a batch's statistics carry information about which samples share it. If the teacher and the student
normalize the same images together, the student can find its positive key through those statistics instead of
through good features. MoCo therefore evaluates the key encoder on a shuffled batch: the global batch is permuted,
each rank runs the teacher on its share of the permutation, and the outputs are put back in order. ISD and MSF do the
same within one node (``get_shuffle_ids`` under ``nn.DataParallel``).

With one rank the teacher sees the whole batch at once, whose BN statistics do not depend on the order, so nothing
is shuffled. The permutation is drawn from (seed, call count), the same on every rank with no communication, and
reproducible after a resume because the count is a checkpointed buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from fastssl.collectives import distributed_world


def shuffle_permutation(n: int, seed: int, call: int) -> torch.Tensor:
    """(n,) int64 permutation of the global batch for teacher call number ``call`` (identical on every rank)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + call)
    return torch.randperm(n, generator=generator)


@torch.no_grad()
def shuffled_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, seed: int, call: int):
    """``fn`` applied to this rank's (B, ...) share of the permuted global batch, outputs restored to ``x``'s order.

    Every rank must call it with the same B. Returns (B, D): row i is fn's output for x[i], computed in the BN batch
    that the permutation assigned to that image.
    """
    world = distributed_world()
    if world == 1:
        return fn(x)
    rank, b = dist.get_rank(), x.shape[0]
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    order = shuffle_permutation(world * b, seed, call).to(x.device)
    mine = order[rank * b : (rank + 1) * b]  # the global rows this rank evaluates
    y = fn(torch.cat(parts)[mine])
    outs = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(outs, y.contiguous())
    gathered = torch.empty_like(torch.cat(outs))
    gathered[order] = torch.cat(outs)  # output j of the shuffled batch belongs to global row order[j]
    return gathered[rank * b : (rank + 1) * b]
