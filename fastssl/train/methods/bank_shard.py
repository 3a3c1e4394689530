"""The bank a method's loss gets in sharded-bank mode (``method.shard_bank``): this rank's shard of the whole bank."""

from __future__ import annotations

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
    rows = -(-method.bank_size // distributed_world())
    return MemoryBank(rows, dim, dtype=bank_dtype(method), init="random", sharded=True)
