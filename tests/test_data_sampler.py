"""Shuffle order, DDP sharding and resume of the shared batch order (oracle: set algebra on indices)."""

from __future__ import annotations

import numpy as np
import pytest

from fastssl.data import ShardedBatchOrder, sample_seeds


def _order(n, bs, rank, world, drop_last, shuffle=True, seed=7):
    return ShardedBatchOrder(n, bs, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world)


@pytest.mark.parametrize("n,world", [(100, 4), (101, 4), (37, 3), (64, 1)])
def test_shards_are_disjoint_equal_and_cover(n, world):
    for drop_last in (True, False):
        shards = [_order(n, 4, r, world, drop_last).rank_indices(epoch=3) for r in range(world)]
        assert len({len(s) for s in shards}) == 1, "equal shard lengths keep DDP collectives in step"
        flat = np.concatenate(shards)
        if drop_last:
            assert len(flat) == len(set(flat.tolist())) == (n // world) * world  # disjoint, nothing repeated
        else:
            assert set(flat.tolist()) == set(range(n))  # covering
            assert len(flat) - len(set(flat.tolist())) == (-n) % world  # only the wrap-around padding repeats


def test_order_is_deterministic_per_epoch_and_changes_across_epochs():
    a, b = _order(50, 5, 0, 1, True), _order(50, 5, 0, 1, True)
    assert np.array_equal(a.rank_indices(2), b.rank_indices(2))
    assert not np.array_equal(a.rank_indices(2), a.rank_indices(3))
    assert not np.array_equal(a.rank_indices(2), _order(50, 5, 0, 1, True, seed=8).rank_indices(2))
    assert np.array_equal(_order(50, 5, 0, 1, True, shuffle=False).rank_indices(4), np.arange(50))


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_yields_exactly_the_remaining_batches(drop_last):
    order = _order(103, 8, 1, 2, drop_last)
    full = list(order.batches(epoch=5))
    assert len(full) == len(order)
    for step in (0, 3, len(order)):
        resumed = list(order.batches(epoch=5, start_step=step))
        assert len(resumed) == len(full) - step
        assert all(np.array_equal(x, y) for x, y in zip(resumed, full[step:], strict=True))
    with pytest.raises(ValueError):
        list(order.batches(epoch=5, start_step=len(order) + 1))


def test_len_counts_partial_batch_only_without_drop_last():
    assert len(_order(100, 8, 0, 2, True)) == 50 // 8
    assert len(_order(100, 8, 0, 2, False)) == 7
    with pytest.raises(ValueError, match="fewer than batch_size"):
        _order(10, 8, 0, 2, True)


def test_sample_seeds_depend_on_seed_epoch_index_only():
    idx = np.arange(1000)
    s = sample_seeds(1, 2, idx)
    assert s.dtype == np.int64 and (s >= 0).all() and len(set(s.tolist())) == 1000
    assert np.array_equal(sample_seeds(1, 2, idx[::-1]), s[::-1])  # position-independent
    assert not np.array_equal(sample_seeds(1, 3, idx), s)
    assert not np.array_equal(sample_seeds(2, 2, idx), s)
