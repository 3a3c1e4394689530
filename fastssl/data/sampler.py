"""Deterministic, DDP-sharded, resumable batch order, and per-sample augmentation seeds.

The order of epoch ``e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``, the same on every rank
and every machine. Rank ``r`` of ``W`` takes ``perm[r::W]`` after the permutation is truncated (``drop_last``) or
wrapped (otherwise) to a multiple of ``W`` -- the layout of ``torch.utils.data.DistributedSampler`` -- so the shards
are disjoint, equally long (no rank waits on a collective the others never call) and, without drop_last, cover the
dataset. Resuming at ``(epoch, step)`` slices the rank's index list at ``step * batch_size``: nothing is replayed and
nothing is decoded for the skipped batches.

Each sample's augmentation randomness comes from ``sample_seeds(seed, epoch, index)``, a hash of the triple that does
not depend on rank, world size, worker count or position in the batch (used by the torchvision backend).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 arrays: a bijective mix with full avalanche."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Per-sample 63-bit seeds for (seed, epoch, dataset index). Returns (len(indices),) int64, non-negative."""
    base = _splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    base = _splitmix64(base ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    mixed = _splitmix64(base ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))
    return (mixed >> np.uint64(1)).astype(np.int64)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fill missing rank/world_size from torch.distributed when it is initialized, else (0, 1)."""
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist_on else 1
    if rank is None:
        rank = torch.distributed.get_rank() if dist_on else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


class ShardedBatchOrder:
    """The batches (arrays of dataset indices) one rank sees in one epoch.

    Args:
        num_samples: dataset size N.
        batch_size: per-rank batch size.
        shuffle: permute each epoch (else dataset order).
        seed: base seed shared by all ranks.
        drop_last: truncate to a multiple of world_size and drop the final partial batch; otherwise wrap around to
            pad the shards to equal length and keep the partial batch.
        rank: this process's rank.
        world_size: number of ranks.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
    ) -> None:
        if num_samples < 1:
            raise ValueError("the source is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        if drop_last:
            self.per_rank = num_samples // world_size
            if self.per_rank < batch_size:
                raise ValueError(
                    f"{num_samples} samples over {world_size} rank(s) leave {self.per_rank} per rank, fewer than "
                    f"batch_size={batch_size}: with drop_last=True no batch would be produced"
                )
        else:
            self.per_rank = -(-num_samples // world_size)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        full, rest = divmod(self.per_rank, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def rank_indices(self, epoch: int) -> np.ndarray:
        """(per_rank,) int64 dataset indices of this rank for ``epoch``, in iteration order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        total = self.per_rank * self.world_size
        if total > self.num_samples:  # pad by wrapping around, as DistributedSampler does
            order = np.concatenate([order, np.resize(order, total - self.num_samples)])
        return order[:total][self.rank :: self.world_size].astype(np.int64)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """Yield the index arrays of batches ``start_step, start_step + 1, ...`` of ``epoch``."""
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step={start_step} outside [0, {len(self)}] batches per epoch")
        idx = self.rank_indices(epoch)
        for step in range(start_step, len(self)):
            yield idx[step * self.batch_size : (step + 1) * self.batch_size]
