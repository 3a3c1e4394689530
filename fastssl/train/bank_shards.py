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
    """Every sharded bank's buffers from every rank, by module name then rank; None without sharded banks.

    A collective: every rank must call it (shards have equal shapes, so a plain all_gather suffices).
    """
    banks = _sharded_banks(model)
    if not banks:
        return None
    world = dist.get_world_size()
    shards: dict[str, list[dict[str, torch.Tensor]]] = {}
    for name, bank in banks.items():
        per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
        for key, tensor in bank.state_dict().items():
            local = tensor.to(comm_device(tensor))
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local)
            for rank, part in enumerate(parts):
                per_rank[rank][key] = part.cpu()
        shards[name] = per_rank
    return shards


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
