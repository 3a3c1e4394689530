"""The bank a method's loss gets in sharded-bank mode (``method.shard_bank``): this rank's shard of the whole bank."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastssl.bank import MemoryBank
from fastssl.collectives import distributed_world
from fastssl.train.config import MethodConfig
from fastssl.train.methods.bank_dtype import bank_dtype


def method_bank(method: MethodConfig, dim: int) -> MemoryBank | None:
    """A sharded MemoryBank of ceil(bank_size / world) rows when ``shard_bank`` is set, else None (the loss module
    builds its own full bank). The whole bank is the union of the ranks' shards, so it grows with the GPU count
    while each GPU stores and streams only its part."""
    if not method.shard_bank:
        return None
    world = distributed_world()
    rows = -(-method.bank_size // world)
    bank = MemoryBank(rows, dim, dtype=bank_dtype(method), init="random", sharded=True)
    if world > 1:
        # Every rank seeds its RNG alike, so the default random rows would repeat on every rank: the whole bank would
        # start as `rows` distinct keys, each `world` times. A per-rank generator gives bank_size distinct keys.
        gen = torch.Generator().manual_seed(torch.initial_seed() + dist.get_rank())
        keys = F.normalize(torch.randn(rows, dim, generator=gen), dim=1)
        bank.queue.copy_(keys.to(bank.queue.dtype))
    return bank
