"""Batches read ahead in worker processes (`prefetch.block_batches_ahead`, workers >= 1): the same
batches in the same order as the plain loop over the blocks, errors raised at their block with
their type, message and origin, and no worker process left behind."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from cachefeat.data.events import bucketed_batches
from cachefeat.data.prefetch import block_batches_ahead
from cachefeat.errors import ORIGIN_ATTR, UserError, library_of

BLOCK = 10
HERE = __name__.split(".")[0]  # what `library_of` names for an error raised in this file (not cachefeat's code)


class Source:
    """Events 0..n-1 with a pseudo-random hit count each; batches padded as a data module pads them.
    `fail_at`: the event whose reading raises `error`."""

    worker_processes = True

    def __init__(self, n: int, fail_at: int | None = None, error=None):
        self.counts = np.random.default_rng(1).integers(1, 30, n)
        self.fail_at, self.error = fail_at, error

    def block_batches(self, start, stop, batch_size):
        if self.fail_at is not None and start <= self.fail_at < stop:
            self.error()
        for local in bucketed_batches(self.counts[start:stop], batch_size, seed=None):
            idx = start + local
            width = int(self.counts[idx].max())
            valid = torch.arange(width)[None, :] < torch.from_numpy(self.counts[idx])[:, None]
            yield local, {"event_id": torch.from_numpy(idx), "hit_valid": valid,
                          "hit_x": torch.where(valid, torch.from_numpy(idx)[:, None] + 0.5, 0.0)}


def _ranges(n):
    return lambda b: (b * BLOCK, min(n, (b + 1) * BLOCK))


def _plain(source, blocks, n, batch_size):
    """The reference: the blocks' batches in this process, one loop, marking each block's last."""
    out = []
    for block in blocks:
        batches = list(source.block_batches(*_ranges(n)(block), batch_size))
        out += [(block, local, batch, k == len(batches) - 1) for k, (local, batch) in enumerate(batches)]
    return out


def _no_workers_left():
    return not [p for p in multiprocessing.active_children() if p.is_alive()]


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_plain_loops_batches_in_order(workers):
    n, blocks = 47, [0, 1, 2, 3, 4]
    source = Source(n)
    want = _plain(source, blocks, n, 4)
    got = list(block_batches_ahead(source, blocks, _ranges(n), 4, depth=2, workers=workers))
    assert [(b, last) for b, _, _, last in got] == [(b, last) for b, _, _, last in want]
    for (_, local, batch, _), (_, local_ref, batch_ref, _) in zip(got, want):
        np.testing.assert_array_equal(local, local_ref)
        assert batch.keys() == batch_ref.keys()
        for key in batch_ref:
            assert batch[key].dtype == batch_ref[key].dtype and torch.equal(batch[key], batch_ref[key]), key
    assert _no_workers_left()


def _user_error():
    raise UserError("event 23 has no hit_valid")


def _numpy_error():
    np.split(np.arange(3), 2)  # a ValueError raised in numpy's Python code


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickling calls cls(*args) with one argument: fails
        super().__init__(f"{a}/{b}")


def _unpicklable():
    raise Unpicklable("x", "y")


@pytest.mark.parametrize("error, kind, message, origin", [
    (_user_error, UserError, "event 23 has no hit_valid", HERE),
    (_numpy_error, ValueError, "equal division", "numpy"),
    (_unpicklable, RuntimeError, "Unpicklable: x/y", HERE),
])
def test_an_error_in_a_worker_is_raised_at_its_block(error, kind, message, origin):
    n = 47
    source = Source(n, fail_at=23, error=error)
    seen = []
    with pytest.raises(kind, match=message) as raised:
        for block, _, _, _ in block_batches_ahead(source, [0, 1, 2, 3, 4], _ranges(n), 4, depth=2, workers=2):
            seen.append(block)
    assert sorted(set(seen)) == [0, 1]  # the blocks before event 23's, whole
    assert getattr(raised.value, ORIGIN_ATTR) == origin and library_of(raised.value) == origin
    assert any("read worker process" in note for note in raised.value.__notes__)
    assert _no_workers_left()


def test_a_consumer_that_stops_early_leaves_no_worker():
    n = 47
    stream = block_batches_ahead(Source(n), [0, 1, 2, 3, 4], _ranges(n), 4, depth=2, workers=2)
    assert next(stream)[0] == 0
    stream.close()
    assert _no_workers_left()


def test_a_source_without_worker_processes_is_read_on_the_thread():
    n = 25
    source = Source(n)
    source.worker_processes = False
    got = list(block_batches_ahead(source, [0, 1, 2], _ranges(n), 4, depth=2, workers=2))
    assert [(b, last) for b, _, _, last in got] == [(b, last) for b, _, _, last in _plain(source, [0, 1, 2], n, 4)]
    assert _no_workers_left()
