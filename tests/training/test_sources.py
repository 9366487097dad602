"""`epoch_event_batches`, the batcher the cached == live claim rests on (the cache-resident and live
sources draw their events from it), against brute-force expectations."""

from __future__ import annotations

import numpy as np
import pytest

from cachefeat.training.sources import epoch_event_batches


@pytest.mark.parametrize("num_events, batch_size, world", [(10, 3, 1), (37, 4, 2), (64, 8, 4), (7, 2, 2)])
def test_every_rank_gets_whole_batches_of_distinct_events(num_events, batch_size, world):
    global_size = batch_size * world
    n_batches = num_events // global_size  # the incomplete tail is dropped
    ranks = [epoch_event_batches(num_events, batch_size, seed=3, epoch=1, rank=r, world=world) for r in range(world)]
    assert [len(batches) for batches in ranks] == [n_batches] * world
    used = np.concatenate([idx for batches in ranks for idx in batches]) if n_batches else np.array([], int)
    assert all(len(idx) == batch_size for batches in ranks for idx in batches)
    assert len(np.unique(used)) == len(used) == n_batches * global_size
    assert used.min(initial=0) >= 0 and used.max(initial=0) < num_events
    assert all(idx.dtype.kind == "i" for batches in ranks for idx in batches)


def test_fewer_events_than_a_global_batch_give_no_batch():
    assert epoch_event_batches(7, 4, seed=1, epoch=0, rank=0, world=2) == []
    assert epoch_event_batches(0, 1, seed=1, epoch=0) == []


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_global_batches_of_one_process(world):
    """Rank r holds the r-th slice of each global batch that one process with batch_size * world
    draws: data parallelism sees the same global batches as one process."""
    one = epoch_event_batches(50, 4 * world, seed=5, epoch=2)
    ranks = [epoch_event_batches(50, 4, seed=5, epoch=2, rank=r, world=world) for r in range(world)]
    for b, global_batch in enumerate(one):
        np.testing.assert_array_equal(np.concatenate([ranks[r][b] for r in range(world)]), global_batch)


def test_order_depends_on_seed_and_epoch_only():
    a = epoch_event_batches(100, 10, seed=1, epoch=0)
    again = epoch_event_batches(100, 10, seed=1, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, again))
    for other in (epoch_event_batches(100, 10, seed=2, epoch=0), epoch_event_batches(100, 10, seed=1, epoch=1)):
        assert not all(np.array_equal(x, y) for x, y in zip(a, other))
    # A whole epoch of batches covers every event when nothing is dropped.
    assert sorted(np.concatenate(a).tolist()) == list(range(100))


def test_the_shuffle_is_uniform():
    """Over 2000 (seed, epoch) draws each of 10 events leads the first batch about equally often
    (200 expected; a plain or rotated arange, or a shuffle that ignores the seed, fails)."""
    counts = np.zeros(10, dtype=int)
    for seed in range(200):
        for epoch in range(10):
            counts[epoch_event_batches(10, 2, seed=seed, epoch=epoch)[0][0]] += 1
    assert counts.sum() == 2000
    assert counts.min() > 140 and counts.max() < 260  # about 4.5 binomial sigmas either side of 200
