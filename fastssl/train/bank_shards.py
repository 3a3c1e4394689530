"""Checkpointing of sharded banks: rank 0 writes the checkpoint, so it must hold every rank's shard."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fastssl.bank import MemoryBank
from fastssl.collectives import comm_device
from fastssl.train.config import ConfigError


def _sharded_banks(model: nn.Module) -> dict[str, MemoryBank]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MemoryBank) and m.is_sharded}


def gather_bank_shards(model: nn.Module) -> dict[str, list[dict[str, torch.Tensor]]] | None:
    """Every sharded bank's buffers from every rank on rank 0 (CPU tensors, by module name then rank); None on the
    other ranks and without sharded banks.

    A collective: every rank must call it. Shards travel one at a time (send/recv to rank 0, then to the CPU), so no
    GPU ever holds more than its own shard plus one other — gathering all of them would put the whole bank, which
    sharding exists to avoid, on every GPU.
    """
    banks = _sharded_banks(model)
    if not banks:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    shards: dict[str, list[dict[str, torch.Tensor]]] = {}
    for name, bank in banks.items():
        per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
        for key, tensor in bank.state_dict().items():
            local = tensor.to(comm_device(tensor))
            if rank == 0:
                per_rank[0][key] = local.cpu()
                for source in range(1, world):
                    incoming = torch.empty_like(local)
                    dist.recv(incoming, src=source)
                    per_rank[source][key] = incoming.cpu()
            else:
                dist.send(local, dst=0)
        shards[name] = per_rank
    return shards if rank == 0 else None


def restore_bank_shards(model: nn.Module, shards: dict[str, list[dict[str, torch.Tensor]]] | None) -> None:
    """Loads this rank's shard of every sharded bank from a checkpoint's ``bank_shards`` (no-op without any).

    Raises:
        ConfigError: the checkpoint's shard layout does not match this run (world size or sharded banks).
    """
    banks = _sharded_banks(model)
    if not banks and not shards:
        return
    if not banks or not shards or set(banks) != set(shards):
        raise ConfigError(
            "run.resume: the checkpoint's sharded banks do not match this run's method.shard_bank setting "
            f"(checkpoint: {sorted(shards or {})}, run: {sorted(banks)})"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    for name, bank in banks.items():
        if len(shards[name]) != world:
            raise ConfigError(
                f"run.resume: the checkpoint holds {len(shards[name])} bank shards but this run has {world} ranks; "
                "resume a sharded bank with the same number of ranks"
            )
        bank.load_state_dict(shards[name][rank])
