"""The training data order: a pure function of the batch position, each sample once per epoch, ranks disjoint."""
from __future__ import annotations

import pytest

from decafa_fast.app.errors import UserError
from decafa_fast.app.training.batches import BatchOrder


def test_epochs_cover_each_sample_once_and_ranks_are_disjoint():
    size, batch, world = 22, 3, 2  # 11 per rank -> 3 full batches per epoch, 2 samples of a shard unused
    orders = [BatchOrder(size, batch, seed=5, rank=r, world_size=world) for r in range(world)]
    assert orders[0].batches_per_epoch == 3
    for epoch in range(3):
        seen = [sum((o.indices(epoch * 3 + k) for k in range(3)), []) for o in orders]
        assert all(len(s) == len(set(s)) == 9 for s in seen)
        assert not set(seen[0]) & set(seen[1])
    # a new permutation each epoch, the same one for the same position
    assert orders[0].indices(0) != orders[0].indices(3)
    assert BatchOrder(size, batch, seed=5, rank=1, world_size=world).indices(7) == orders[1].indices(7)
    assert BatchOrder(size, batch, seed=6, rank=1, world_size=world).indices(7) != orders[1].indices(7)


def test_small_sets_give_one_smaller_batch_and_empty_shards_are_refused():
    order = BatchOrder(5, 8, seed=0)
    assert order.batches_per_epoch == 1 and sorted(order.indices(0)) == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="a training set of 1 sample.*2 processes"):
        BatchOrder(1, 4, seed=0, world_size=2)
